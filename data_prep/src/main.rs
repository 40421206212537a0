//! `data_prep`: download TinyStories, train a byte-level BPE tokenizer and write u16 token files.
//!
//! A thin command-line front end over the `data_prep` library; see `data_prep --help`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use data_prep::pipeline::{DEFAULT_CHUNK_STORIES, DEFAULT_VAL_FRACTION};
use data_prep::synth::DEFAULT_SYNTH_STORIES;
use data_prep::tokenizer::{DEFAULT_MIN_FREQUENCY, DEFAULT_VOCAB_SIZE};
use data_prep::{BuildOptions, Meta, Split, TinyStoriesOptions, VerifyOptions, EOT_TOKEN};

/// Prepare TinyStories-style data for Bit-Llama Lab.
///
/// A build folder holds tokenizer.json (byte-level BPE; <|endoftext|> = 0, <|padding|> = 1),
/// train.bin and val.bin (little-endian u16 token ids, each story followed by <|endoftext|>)
/// and meta.json (counts, bytes, sha256 of every file, settings), written last.
#[derive(Parser, Debug)]
#[command(name = "data_prep", version, propagate_version = true)]
struct Cli {
    /// Only print warnings and errors (no progress, no info lines).
    #[arg(long, short, global = true)]
    quiet: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build a tokenizer and token files from local story text files.
    ///
    /// Reads UTF-8 text in which stories are separated by the separator (default <|endoftext|>,
    /// on a line of its own in the TinyStories .txt format; it ends a story wherever it occurs). Stories are trimmed and empty ones
    /// skipped. Without --val-input, each --input story goes to val with probability
    /// --val-fraction, decided by a hash of (--seed, story index), so the split is
    /// deterministic; with --val-input, all --input stories are train and the --val-input
    /// stories are val. The tokenizer is trained on the train stories only. Inputs of any size
    /// are streamed. Writes DIR/tokenizer.json, DIR/train.bin, DIR/val.bin and DIR/meta.json.
    /// An identical rebuild is skipped ("up to date"); a folder holding a different build is
    /// refused unless --force.
    Build(BuildArgs),

    /// Download TinyStories from the Hugging Face hub and build it.
    ///
    /// Downloads the train and validation .txt files of the chosen release into DIR/raw/
    /// (resuming an interrupted download from its .part file), then runs `build` with the
    /// official validation file as the val split. Without network access it fails within
    /// seconds; then fetch the files another way and use `data_prep build --input FILE
    /// --val-input FILE --out DIR`.
    Tinystories(TinyStoriesArgs),

    /// Write a deterministic synthetic story corpus (for tests and smoke runs).
    ///
    /// Stories of 3 to 8 sentences with some dialogue, generated from a small built-in
    /// grammar (no third-party text), in the TinyStories format: each story followed by a
    /// line <|endoftext|>. The same --stories and --seed give a byte-identical file.
    Synth(SynthArgs),

    /// Check a build folder against its meta.json (and its inputs, if still present).
    ///
    /// Checks tokenizer.json's hash, vocabulary size and special ids, each .bin file's size,
    /// sha256, token and story counts and that every id is below the vocabulary size, and
    /// decodes every story to recount the bytes. When the input files recorded in meta.json
    /// are still there, every decoded story is compared with its input story (exact round
    /// trip).
    Verify(VerifyArgs),
}

#[derive(Args, Debug)]
struct TokenizerArgs {
    /// Requested vocabulary size (258..=65536; ids are stored as u16).
    #[arg(long, default_value_t = DEFAULT_VOCAB_SIZE)]
    vocab_size: usize,

    /// Minimum frequency of a pair to become a BPE merge.
    #[arg(long, default_value_t = DEFAULT_MIN_FREQUENCY)]
    min_frequency: u64,

    /// Overwrite a different build in the output folder (and rebuild even if up to date).
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
struct BuildArgs {
    /// Story text file(s); several may follow one --input or --input may repeat.
    #[arg(long = "input", value_name = "FILE", num_args = 1.., required = true)]
    inputs: Vec<PathBuf>,

    /// Output folder.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,

    /// Validation story file(s); when given, every --input story is train.
    #[arg(long = "val-input", value_name = "FILE", num_args = 1..)]
    val_inputs: Vec<PathBuf>,

    /// Fraction of --input stories sent to val (ignored with --val-input).
    #[arg(long, default_value_t = DEFAULT_VAL_FRACTION)]
    val_fraction: f64,

    /// Seed of the train/val split.
    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// The text that separates stories: it ends a story wherever it occurs, also inside a line, so
    /// pick one that stories never contain (may start with '-', e.g. --separator ---END---).
    #[arg(long, default_value = EOT_TOKEN, allow_hyphen_values = true)]
    separator: String,

    /// Stories encoded per parallel chunk.
    #[arg(long, default_value_t = DEFAULT_CHUNK_STORIES, hide = true)]
    chunk_stories: usize,

    #[command(flatten)]
    tokenizer: TokenizerArgs,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum VariantArg {
    /// TinyStoriesV2-GPT4-{train,valid}.txt
    V2,
    /// TinyStories-{train,valid}.txt
    V1,
}

#[derive(Args, Debug)]
struct TinyStoriesArgs {
    /// Build folder; the downloaded files go to DIR/raw/.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,

    /// Which TinyStories release.
    #[arg(long, value_enum, default_value = "v2")]
    variant: VariantArg,

    /// Base URL to download from (a mirror; tests point it at an unreachable address).
    #[arg(long, env = data_prep::download::HF_BASE_ENV, hide = true)]
    base_url: Option<String>,

    #[command(flatten)]
    tokenizer: TokenizerArgs,
}

#[derive(Args, Debug)]
struct SynthArgs {
    /// Output text file.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,

    /// Number of stories.
    #[arg(long, default_value_t = DEFAULT_SYNTH_STORIES)]
    stories: usize,

    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    /// Build folder (holding meta.json).
    #[arg(value_name = "DIR")]
    dir: PathBuf,

    /// Do not compare with the input files even if they are present.
    #[arg(long)]
    no_inputs: bool,
}

fn print_summary(dir: &std::path::Path, meta: &Meta) {
    println!("build: {}", dir.display());
    println!("vocab_size: {}", meta.vocab_size);
    for split in Split::ALL {
        let s = meta.split(split);
        println!(
            "{split}: {} tokens, {} stories, {} bytes ({:.3} bytes/token) -> {}",
            s.tokens,
            s.stories,
            s.bytes,
            s.bytes as f64 / s.tokens.max(1) as f64,
            meta.split_path(dir, split).display()
        );
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let progress = !cli.quiet;
    match cli.command {
        Command::Build(a) => {
            let opts = BuildOptions {
                inputs: a.inputs,
                val_inputs: a.val_inputs,
                out: a.out,
                vocab_size: a.tokenizer.vocab_size,
                min_frequency: a.tokenizer.min_frequency,
                val_fraction: a.val_fraction,
                seed: a.seed,
                separator: a.separator,
                force: a.tokenizer.force,
                progress,
                chunk_stories: a.chunk_stories,
            };
            let meta = data_prep::build(&opts)
                .with_context(|| format!("build into {} failed", opts.out.display()))?;
            print_summary(&opts.out, &meta);
        }
        Command::Tinystories(a) => {
            let mut opts = TinyStoriesOptions::new(&a.out);
            opts.variant = match a.variant {
                VariantArg::V2 => data_prep::Variant::V2,
                VariantArg::V1 => data_prep::Variant::V1,
            };
            opts.base_url = a.base_url;
            opts.build.vocab_size = a.tokenizer.vocab_size;
            opts.build.min_frequency = a.tokenizer.min_frequency;
            opts.build.force = a.tokenizer.force;
            opts.build.progress = progress;
            let meta = data_prep::tinystories(&opts)
                .with_context(|| format!("tinystories into {} failed", a.out.display()))?;
            print_summary(&a.out, &meta);
        }
        Command::Synth(a) => {
            data_prep::synth(&a.out, a.stories, a.seed)
                .with_context(|| format!("synth into {} failed", a.out.display()))?;
            let bytes = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
            println!(
                "wrote {} stories ({bytes} bytes, seed {}) to {}",
                a.stories,
                a.seed,
                a.out.display()
            );
        }
        Command::Verify(a) => {
            let opts = VerifyOptions {
                compare_inputs: !a.no_inputs,
                progress,
            };
            // Its errors name the folder and the problem already.
            let report = data_prep::verify(&a.dir, &opts)?;
            print_summary(&a.dir, &report.meta);
            let inputs = match (&report.input_changed, report.inputs_compared) {
                (Some(p), _) => format!(
                    "input {} changed since the build, so stories were not compared with the inputs",
                    p.display()
                ),
                (None, true) => "every story decodes back to its input story exactly".into(),
                (None, false) => "inputs not compared (not present or --no-inputs)".into(),
            };
            println!("ok: hashes, counts and ids match meta.json; {inputs}");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if cli.quiet { "warn" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time()
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
