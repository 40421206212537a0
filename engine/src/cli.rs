//! The `engine` command line, in the library so that the runner can start the same engine from its own
//! binary when no separate `engine` executable is installed.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::events::{EXIT_ERROR, EXIT_INTERRUPTED};
use crate::train::{train, Outcome, TrainArgs};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "engine",
    version,
    about = "Bit-Llama engine: train ternary-weight TTT language models"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a run, or resume one. Prints one JSON event per line on stdout (see engine/PROTOCOL.md) and
    /// the same lines to RUN_DIR/metrics.jsonl; human progress goes to stderr. SIGINT/SIGTERM finish the
    /// step, write a checkpoint and exit with code 130; a second signal exits at once.
    ///
    /// Settings are layered: built-in defaults → --config TOML → ENGINE_<KEY> environment → --set key=value.
    /// `engine keys` lists every key with its default and meaning.
    #[command(
        after_help = "Examples:\n  engine train --config run.toml --out runs/a --set steps=200\n  engine train --resume runs/a --set steps=400\n  engine keys      # every setting, its default and meaning"
    )]
    Train {
        /// A flat TOML table of run settings (dim, n_layers, data_dir, steps, lr, ...).
        #[arg(long, value_name = "RUN.toml", conflicts_with = "resume")]
        config: Option<PathBuf>,
        /// The run directory to create (config.toml, metrics.jsonl, checkpoints/).
        #[arg(long, value_name = "RUN_DIR", required_unless_present = "resume")]
        out: Option<PathBuf>,
        /// Continue the run in RUN_DIR from its newest valid checkpoint.
        #[arg(long, value_name = "RUN_DIR", conflicts_with = "out")]
        resume: Option<PathBuf>,
        /// Override one setting, e.g. --set steps=500 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Stop once the run has used this budget (steps=N, tokens=N or seconds=N): an eval, a checkpoint,
        /// a `paused` event and exit code 0; `--resume` continues it exactly (the runner's early stopping
        /// pauses runs at its rungs this way).
        #[arg(long, value_name = "UNIT=VALUE")]
        pause_at: Option<crate::train::budget::PauseAt>,
    },
    /// List every run setting (the keys of run.toml, a sweep's [base]/[sweep], ENGINE_<KEY> and --set) with
    /// its default and meaning.
    Keys,
    /// Benchmark the CPU all-reduce (TCP ring) between `--world` local processes; prints one JSON line per
    /// size with the median time and bus bandwidth.
    BenchAllreduce {
        /// Processes (ranks) started on this machine.
        #[arg(long, default_value_t = 2)]
        world: usize,
        /// Buffer sizes in floats, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1000000,16000000")]
        floats: Vec<usize>,
        /// Timed all-reduces per size (the median is reported), after one warm-up.
        #[arg(long, default_value_t = 5)]
        iters: usize,
    },
    /// Benchmark training steps (forward + backward + AdamW) on random tokens with random weights, the same
    /// workload as ../shared/bench/bitllama_torch.py; also times writing and loading one checkpoint.
    /// Prints one JSON object.
    BenchTrain {
        /// bitttt (TTT + BitLinear), llama (attention + float linears), attention (attention + BitLinear),
        /// floatttt (TTT + float linears).
        #[arg(long, default_value = "bitttt")]
        arch: String,
        /// Model width.
        #[arg(long, default_value_t = 256)]
        dim: usize,
        /// Blocks.
        #[arg(long, default_value_t = 4)]
        layers: usize,
        /// Attention heads (and TTT heads).
        #[arg(long, default_value_t = 4)]
        heads: usize,
        /// Sequences per step.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 128)]
        ctx: usize,
        /// Vocabulary size (embedding and head rows).
        #[arg(long, default_value_t = 16384)]
        vocab: usize,
        /// TTT inner-loop mini-batch (tokens per inner gradient step).
        #[arg(long, default_value_t = 16)]
        mini_batch: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// cpu or cuda:N (CUDA build).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// f32, or bf16 (mixed precision: bf16 matmuls, f32 weights and optimizer; CUDA only).
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Which TTT-Linear definition: authors (the default keys), legacy (the engine's first one: no token
        /// scaling, θ_lr bias, inner RoPE or post-norm), or mamba (the authors' with the Mamba backbone).
        #[arg(long, default_value = "authors")]
        ttt: String,
    },
    /// Generate text from a trained model, streamed token by token to stdout. Without --prompt, prompts are
    /// read from stdin one per line until EOF or /quit. On CPU the ternary linears run packed (2 bits per
    /// weight, int8 activations); TTT layers carry their hidden state, attention layers a KV cache.
    #[command(
        after_help = "Examples:\n  engine generate --checkpoint runs/a --prompt \"Once upon a time\" --max-tokens 100\n  engine generate --checkpoint model.safetensors --temperature 0.8 --top-p 0.9"
    )]
    Generate {
        /// A run dir (its newest valid checkpoint), a checkpoint dir (RUN_DIR/checkpoints/step-N) or a file
        /// written by `engine export`.
        #[arg(long, value_name = "RUN_DIR|CHECKPOINT_DIR|EXPORTED_FILE")]
        checkpoint: PathBuf,
        /// The text to continue; without it, read prompts from stdin (interactive).
        #[arg(long)]
        prompt: Option<String>,
        /// Stop after this many new tokens (or earlier, at the end-of-text token).
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        /// Sampling temperature; 0 = greedy.
        #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
        temperature: f64,
        /// Sample among the k most likely tokens only (0: no limit).
        #[arg(long)]
        top_k: Option<usize>,
        /// Sample among the most likely tokens covering probability p only (nucleus sampling).
        #[arg(long)]
        top_p: Option<f64>,
        /// Seed of the sampler: the same seed, prompt and settings give the same text.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// cpu (packed ternary kernels) or cuda:N (the training model on the GPU; needs a CUDA build).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// On CPU, keep the embedding and output head in f32 (logits exactly those of the trained model, at
        /// 4× their memory) instead of int8 with a scale per row.
        #[arg(long)]
        f32_tables: bool,
    },
    /// Write a trained model as one file for `engine generate`: packed ternary weights + scales, the other
    /// tensors in f32, the model config and the tokenizer (safetensors with metadata).
    Export {
        /// A run dir, a checkpoint dir or an exported file.
        #[arg(long, value_name = "RUN_DIR|CHECKPOINT_DIR|EXPORTED_FILE")]
        checkpoint: PathBuf,
        /// The file to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Benchmark batch-1 generation on a model with random weights: prompt and decode tokens/s and weight
    /// bytes of the packed ternary path and of the f32 path (the same quantized weights held in f32).
    BenchGenerate {
        /// Model width.
        #[arg(long, default_value_t = 256)]
        dim: usize,
        /// Blocks.
        #[arg(long, default_value_t = 4)]
        n_layers: usize,
        /// Attention heads (and TTT heads).
        #[arg(long, default_value_t = 4)]
        n_heads: usize,
        /// Vocabulary size.
        #[arg(long, default_value_t = 16384)]
        vocab: usize,
        /// Decoded tokens timed.
        #[arg(long, default_value_t = 64)]
        tokens: usize,
        /// Prompt length (prefill timed separately).
        #[arg(long, default_value_t = 64)]
        prompt_tokens: usize,
        /// ttt or attention.
        #[arg(long, default_value = "ttt")]
        mixer: String,
        /// TTT inner-loop mini-batch.
        #[arg(long, default_value_t = 16)]
        mini_batch: usize,
        /// Keep the packed path's embedding and head in f32 (as `generate --f32-tables`).
        #[arg(long)]
        f32_tables: bool,
        /// Attention window in tokens (`generate` uses the trained context_len); attention models only.
        #[arg(long)]
        window: Option<usize>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Keep freed tensor buffers in the heap instead of returning them to the kernel: every op allocates its
/// output, and with glibc's defaults each large buffer is a fresh mmap whose pages fault and are zeroed again
/// on every step. Raising the mmap and trim thresholds makes the allocator reuse them.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters; called before any threads start.
    unsafe {
        // 32 MiB is glibc's largest allowed mmap threshold on 64-bit.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        // Larger blocks (the B×T×V logits and their gradient: 64 MiB at B=8 T=128 V=16,384) would still be
        // mmapped, faulted in and zeroed page by page every step; from the heap they are reused instead.
        // Measured +12 % tokens/s at that shape (5 alternating runs), same peak RSS.
        libc::mallopt(libc::M_MMAP_MAX, 0);
    }
}

/// For training: leave candle's element-wise worker pool at the calling thread alone (unless
/// `CANDLE_NUM_THREADS` is set).
/// The large element-wise work of a training step runs in our fused ops on rayon; what stays in candle's
/// pool is small, and its extra worker spins between ops on a core the GEMM threads need: measured
/// +4.5 % (TTT) and +5 % (attention) training tokens/s on 2 cores (4 alternating runs each).
fn tune_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Called right after argument parsing, before any thread exists.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Parse `args` (the first is the program name) and run the command.
pub fn run_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    tune_allocator();
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // A failed log write is dropped, not reported with a panicking eprintln! (closed stderr).
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .try_init();
    let cli = Cli::parse_from(args);
    if matches!(
        cli.command,
        Command::Train { .. } | Command::BenchTrain { .. }
    ) {
        tune_threads();
    }
    match cli.command {
        Command::Keys => {
            use std::io::Write;
            let _ = std::io::stdout().write_all(crate::train::config::keys_table().as_bytes());
            ExitCode::SUCCESS
        }
        Command::BenchAllreduce {
            world,
            floats,
            iters,
        } => match crate::dist::bench::bench_allreduce(world.max(2), &floats, iters.max(1)) {
            Ok(lines) => {
                for l in lines {
                    println!("{l}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                crate::say!("error: {}", crate::error_line(&e));
                ExitCode::from(EXIT_ERROR as u8)
            }
        },
        Command::BenchTrain {
            arch,
            dim,
            layers,
            heads,
            batch,
            ctx,
            vocab,
            mini_batch,
            steps,
            warmup,
            device,
            dtype,
            ttt,
        } => {
            let result = (|| -> anyhow::Result<String> {
                let matmul_dtype = match dtype.as_str() {
                    "f32" => candle_core::DType::F32,
                    "bf16" if device.starts_with("cuda") => candle_core::DType::BF16,
                    other => anyhow::bail!("--dtype {other:?}: use f32, or bf16 on a cuda device"),
                };
                let (mixer, weights) = crate::bench::parse_arch(&arch).ok_or_else(|| {
                    anyhow::anyhow!("--arch {arch:?}: use bitttt, llama, attention or floatttt")
                })?;
                let model = crate::model::ModelConfig {
                    vocab_size: vocab,
                    dim,
                    n_layers: layers,
                    n_heads: heads,
                    mixer,
                    weights,
                    mlp_hidden: None,
                    ttt_mini_batch: mini_batch,
                    ttt_base_lr: 1.0,
                    tie_embeddings: false,
                    ..Default::default()
                };
                let model = match ttt.as_str() {
                    "authors" => model,
                    "legacy" => model.legacy(),
                    "mamba" => crate::model::ModelConfig {
                        ttt_backbone: crate::model::Backbone::Mamba,
                        ..model
                    },
                    other => anyhow::bail!("--ttt {other:?}: use authors, legacy or mamba"),
                };
                let b = crate::bench::BenchTrain {
                    model,
                    batch,
                    ctx,
                    steps: steps.max(1),
                    warmup,
                    device: crate::device::device_from_name(&device)?,
                };
                let _autocast = crate::model::precision::Autocast::new(matmul_dtype);
                Ok(serde_json::to_string(&crate::bench::bench_train(&b)?)?)
            })();
            match result {
                Ok(line) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    crate::say!("error: {}", crate::error_line(&e));
                    ExitCode::from(EXIT_ERROR as u8)
                }
            }
        }
        Command::Generate {
            checkpoint,
            prompt,
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            device,
            f32_tables,
        } => {
            let args = crate::infer::GenerateArgs {
                checkpoint,
                prompt,
                max_tokens,
                sampler: crate::infer::SamplerConfig {
                    temperature,
                    top_k,
                    top_p,
                    seed,
                },
                device,
                f32_tables,
            };
            let stdin = std::io::stdin();
            let stdout = std::io::stdout();
            match crate::infer::run_generate(&args, &mut stdin.lock(), &mut stdout.lock()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    crate::say!("error: {}", crate::error_line(&e));
                    ExitCode::from(EXIT_ERROR as u8)
                }
            }
        }
        Command::Export { checkpoint, out } => match crate::infer::run_export(&checkpoint, &out) {
            Ok(summary) => {
                crate::say!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                crate::say!("error: {}", crate::error_line(&e));
                ExitCode::from(EXIT_ERROR as u8)
            }
        },
        Command::BenchGenerate {
            dim,
            n_layers,
            n_heads,
            vocab,
            tokens,
            prompt_tokens,
            mixer,
            mini_batch,
            f32_tables,
            window,
            json,
        } => {
            let result = (|| -> anyhow::Result<String> {
                let mixer = match mixer.as_str() {
                    "ttt" => crate::model::MixerKind::Ttt,
                    "attention" => crate::model::MixerKind::Attention,
                    other => anyhow::bail!("--mixer {other:?}: use ttt or attention"),
                };
                let b = crate::infer::bench::BenchGenerate {
                    model: crate::model::ModelConfig {
                        vocab_size: vocab,
                        dim,
                        n_layers,
                        n_heads,
                        mixer,
                        weights: crate::model::WeightKind::Ternary,
                        mlp_hidden: None,
                        ttt_mini_batch: mini_batch,
                        ttt_base_lr: 1.0,
                        tie_embeddings: false,
                        ..Default::default()
                    },
                    tokens,
                    prompt_tokens,
                    seed: 0,
                    f32_tables,
                    window,
                };
                let r = crate::infer::bench::bench_generate(&b)?;
                Ok(if json {
                    serde_json::to_string(&r)?
                } else {
                    crate::infer::bench::format_table(&r)
                })
            })();
            match result {
                Ok(text) => {
                    println!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    crate::say!("error: {}", crate::error_line(&e));
                    ExitCode::from(EXIT_ERROR as u8)
                }
            }
        }
        Command::Train {
            config,
            out,
            resume,
            sets,
            pause_at,
        } => match train(&TrainArgs {
            config,
            out,
            resume,
            sets,
            pause_at,
        }) {
            Ok(Outcome::Done | Outcome::Paused) => ExitCode::SUCCESS,
            Ok(Outcome::Interrupted) => ExitCode::from(EXIT_INTERRUPTED as u8),
            Err(e) => {
                crate::say!("error: {}", crate::error_line(&e));
                ExitCode::from(EXIT_ERROR as u8)
            }
        },
    }
}
