//! `build`: stories in, tokenizer and token files out.
//!
//! Three streaming passes over the inputs, memory bounded by a chunk of stories plus the
//! tokenizer trainer's word counts (bounded by the number of distinct words):
//!
//! 1. **scan**: hash every input (SHA-256), check the format, count the stories of each split.
//!    All input errors (missing or empty file, no separator, bad UTF-8, an empty split) and
//!    the "different build already in the folder" check happen here, before any slow work.
//! 2. **train**: feed the train stories to the BPE trainer; save `tokenizer.json`.
//! 3. **encode**: encode chunks of stories in parallel and append them to `train.bin` /
//!    `val.bin`.
//!
//! Every output is written under a temporary name, fsynced and renamed; `meta.json` is removed
//! first and written last, so a folder with a `meta.json` always holds a complete build.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::encode::{encode_chunk, TokenWriter};
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{sha256_file, tmp_path};
use crate::meta::{
    FileRecord, Meta, SplitStats, TokenizerInfo, ValSource, BYTES_DEFINITION, FORMAT_VERSION,
    META_FILE, TOKENIZER_FILE, TOKEN_DTYPE,
};
use crate::progress::Progress;
use crate::split::{Corpus, Split, SplitStories, Splitter};
use crate::tokenizer::{
    story_encoder, train_tokenizer, validate_vocab_size, vocab_size_of, TokenizerSettings,
    DEFAULT_MIN_FREQUENCY, DEFAULT_VOCAB_SIZE, EOT_ID, EOT_TOKEN, PAD_ID,
};

/// Default fraction of `--input` stories that go to val.
pub const DEFAULT_VAL_FRACTION: f64 = 0.05;
/// Stories encoded per parallel chunk.
pub const DEFAULT_CHUNK_STORIES: usize = 4096;

/// Everything `build` needs.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// Text files of stories (`--input`), read in order.
    pub inputs: Vec<PathBuf>,
    /// Validation text files (`--val-input`); when given, all `inputs` stories are train.
    pub val_inputs: Vec<PathBuf>,
    /// Output folder.
    pub out: PathBuf,
    /// Requested vocabulary size, 258..=65536.
    pub vocab_size: usize,
    /// Minimum pair frequency for a BPE merge.
    pub min_frequency: u64,
    /// Fraction of `inputs` stories sent to val (ignored with `val_inputs`).
    pub val_fraction: f64,
    /// Seed of the split.
    pub seed: u64,
    /// Story separator.
    pub separator: String,
    /// Overwrite a different build in `out`, and rebuild even if up to date.
    pub force: bool,
    /// Show progress on stderr.
    pub progress: bool,
    /// Stories per parallel encoding chunk.
    pub chunk_stories: usize,
}

impl BuildOptions {
    /// Options with the CLI defaults (vocab 16384, val fraction 0.05, seed 0, no progress).
    pub fn new(inputs: Vec<PathBuf>, out: impl Into<PathBuf>) -> Self {
        BuildOptions {
            inputs,
            val_inputs: Vec::new(),
            out: out.into(),
            vocab_size: DEFAULT_VOCAB_SIZE,
            min_frequency: DEFAULT_MIN_FREQUENCY,
            val_fraction: DEFAULT_VAL_FRACTION,
            seed: 0,
            separator: EOT_TOKEN.to_owned(),
            force: false,
            progress: false,
            chunk_stories: DEFAULT_CHUNK_STORIES,
        }
    }

    /// The corpus (inputs and split) these options describe.
    pub fn corpus(&self) -> Corpus {
        Corpus {
            inputs: self.inputs.clone(),
            val_inputs: self.val_inputs.clone(),
            separator: self.separator.clone(),
            splitter: Splitter::new(self.seed, self.val_fraction),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.inputs.is_empty() {
            return Err(Error::NoInputs);
        }
        if self.separator.trim().is_empty() || self.separator.contains(['\n', '\r']) {
            return Err(Error::BadSeparator(self.separator.clone()));
        }
        validate_vocab_size(self.vocab_size)?;
        if !(0.0..=1.0).contains(&self.val_fraction) {
            return Err(Error::ValFraction(self.val_fraction));
        }
        for p in self.inputs.iter().chain(&self.val_inputs) {
            crate::corpus::open_input(p)?;
        }
        Ok(())
    }

    /// A meta.json skeleton with these settings (counts and hashes empty).
    fn meta_skeleton(&self, inputs: Vec<FileRecord>, val_inputs: Vec<FileRecord>) -> Meta {
        Meta {
            format_version: FORMAT_VERSION,
            created_by: format!("data_prep {}", env!("CARGO_PKG_VERSION")),
            vocab_size: 0,
            eot_id: EOT_ID,
            pad_id: PAD_ID,
            token_dtype: TOKEN_DTYPE.into(),
            bytes_definition: BYTES_DEFINITION.into(),
            seed: self.seed,
            val_fraction: self.val_fraction,
            val_source: if self.val_inputs.is_empty() {
                ValSource::Split
            } else {
                ValSource::ValInput
            },
            separator: self.separator.clone(),
            tokenizer: TokenizerInfo {
                file: TOKENIZER_FILE.into(),
                sha256: String::new(),
                settings: TokenizerSettings::new(self.vocab_size, self.min_frequency),
            },
            inputs,
            val_inputs,
            train: SplitStats::default(),
            val: SplitStats::default(),
        }
    }
}

/// Result of the scan pass.
#[derive(Debug, Default)]
struct Scan {
    inputs: Vec<FileRecord>,
    val_inputs: Vec<FileRecord>,
    stories: [u64; 2],
    bytes: [u64; 2],
    input_stories: u64,
}

fn idx(split: Split) -> usize {
    match split {
        Split::Train => 0,
        Split::Val => 1,
    }
}

fn total_input_bytes(opts: &BuildOptions) -> u64 {
    opts.inputs
        .iter()
        .chain(&opts.val_inputs)
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

fn canonical_records(records: &[FileRecord]) -> Vec<FileRecord> {
    records
        .iter()
        .map(|r| FileRecord {
            path: std::fs::canonicalize(&r.path).unwrap_or_else(|_| r.path.clone()),
            ..r.clone()
        })
        .collect()
}

fn scan(opts: &BuildOptions, total: u64) -> Result<Scan> {
    let progress = Progress::new(opts.progress, "scan", total);
    let mut stream = opts.corpus().stories_hashed();
    let mut s = Scan::default();
    let val_from_inputs = opts.val_inputs.is_empty();
    let bytes_done = stream.bytes_counter();
    let mut n = 0u64;
    for story in stream.by_ref() {
        let story = story?;
        let i = idx(story.split);
        s.stories[i] += 1;
        s.bytes[i] += story.text.len() as u64;
        if val_from_inputs || story.split == Split::Train {
            s.input_stories += 1;
        }
        n += 1;
        if n & 1023 == 0 {
            progress.set(bytes_done.load(Ordering::Relaxed));
        }
    }
    progress.finish();
    let records = canonical_records(stream.records());
    let (a, b) = records.split_at(opts.inputs.len());
    s.inputs = a.to_vec();
    s.val_inputs = b.to_vec();
    Ok(s)
}

fn check_splits(opts: &BuildOptions, s: &Scan) -> Result<()> {
    if s.stories[idx(Split::Train)] == 0 {
        let reason = if s.input_stories == 0 {
            "the --input files hold no stories".to_owned()
        } else {
            format!(
                "all {} stories went to val at val fraction {}",
                s.input_stories, opts.val_fraction
            )
        };
        return Err(Error::EmptyTrainSplit { reason });
    }
    if s.stories[idx(Split::Val)] == 0 && !opts.val_inputs.is_empty() {
        return Err(Error::EmptyValInputs {
            separator: opts.separator.clone(),
        });
    }
    if s.stories[idx(Split::Val)] == 0 {
        return Err(Error::EmptyValSplit {
            stories: s.input_stories,
            val_fraction: opts.val_fraction,
        });
    }
    Ok(())
}

/// Checks that the outputs named by `meta` exist with the recorded hashes.
fn outputs_match(dir: &Path, meta: &Meta) -> bool {
    let check = |file: &str, sha: &str| {
        sha256_file(&dir.join(file))
            .map(|h| h == sha)
            .unwrap_or(false)
    };
    check(&meta.tokenizer.file, &meta.tokenizer.sha256)
        && check(&meta.train.file, &meta.train.sha256)
        && check(&meta.val.file, &meta.val.sha256)
}

/// What an existing build folder means for this build.
enum Existing {
    /// Nothing there (or no meta.json: an interrupted build, overwritten).
    None,
    /// Same inputs and settings, outputs intact.
    UpToDate(Box<Meta>),
    /// Different, but `--force` was given (or the same with broken outputs): rebuild.
    Rebuild,
}

fn existing_meta(dir: &Path) -> Option<Result<Meta>> {
    dir.join(META_FILE).exists().then(|| Meta::load(dir))
}

fn check_existing(opts: &BuildOptions, wanted: &Meta) -> Result<Existing> {
    let old = match existing_meta(&opts.out) {
        None => return Ok(Existing::None),
        Some(Ok(old)) => old,
        Some(Err(_)) if opts.force => return Ok(Existing::Rebuild),
        Some(Err(e)) => {
            return Err(Error::DifferentBuild {
                dir: opts.out.clone(),
                reason: format!("its meta.json is unreadable: {e}"),
            })
        }
    };
    match old.build_difference(wanted) {
        Some(_) if opts.force => Ok(Existing::Rebuild),
        Some(reason) => Err(Error::DifferentBuild {
            dir: opts.out.clone(),
            reason,
        }),
        None if !opts.force && outputs_match(&opts.out, &old) => {
            Ok(Existing::UpToDate(Box::new(old)))
        }
        None => Ok(Existing::Rebuild),
    }
}

/// Runs the whole build (see the module docs) and returns the written [`Meta`].
///
/// If `opts.out` already holds a build of the same inputs and settings with intact outputs,
/// nothing is rewritten and its meta is returned (unless `force`).
pub fn build(opts: &BuildOptions) -> Result<Meta> {
    opts.validate()?;
    let total = total_input_bytes(opts);
    let started = Instant::now();

    tracing::info!(
        "scanning {} input file(s), {:.1} MB",
        opts.inputs.len() + opts.val_inputs.len(),
        total as f64 / 1e6
    );
    let scan = scan(opts, total)?;
    check_splits(opts, &scan)?;
    for v in &scan.val_inputs {
        if let Some(t) = scan.inputs.iter().find(|t| t.sha256 == v.sha256) {
            tracing::warn!(
                "--val-input {} is identical to --input {}: val stories are also trained on",
                v.path.display(),
                t.path.display()
            );
        }
    }
    let mut meta = opts.meta_skeleton(scan.inputs.clone(), scan.val_inputs.clone());
    // Up to date (or refused) without touching the folder: a finished build may be read-only.
    if let Existing::UpToDate(old) = check_existing(opts, &meta)? {
        tracing::info!("{} is up to date; nothing to do", opts.out.display());
        return Ok(*old);
    }
    std::fs::create_dir_all(&opts.out)
        .ctx(|| format!("cannot create output folder {}", opts.out.display()))?;
    // One build at a time per folder (two would write the same temporary files); a second one waits
    // and then finds the first one's result up to date.
    let lock = crate::fsutil::lock_dir(&opts.out, ".build.lock")?;
    // Checked again (hashing the outputs) only if another build held the folder meanwhile.
    if lock.waited {
        if let Existing::UpToDate(old) = check_existing(opts, &meta)? {
            tracing::info!("{} was built meanwhile; nothing to do", opts.out.display());
            return Ok(*old);
        }
    }
    let meta_path = opts.out.join(META_FILE);
    if meta_path.exists() {
        std::fs::remove_file(&meta_path)
            .ctx(|| format!("cannot remove old {}", meta_path.display()))?;
        crate::fsutil::sync_dir(&opts.out);
    }

    let tok = train_pass(opts, &scan)?;
    let tok_path = opts.out.join(TOKENIZER_FILE);
    let tok_tmp = tmp_path(&tok_path);
    tok.save(&tok_tmp, false)
        .map_err(|e| Error::tokenizer(format!("saving {}", tok_tmp.display()), e))?;
    std::fs::File::open(&tok_tmp)
        .and_then(|f| f.sync_all())
        .ctx(|| format!("cannot fsync {}", tok_tmp.display()))?;
    crate::fsutil::rename_into_place(&tok_tmp, &tok_path)?;
    meta.tokenizer.sha256 = sha256_file(&tok_path)?;
    meta.vocab_size = vocab_size_of(&tok);

    let ([train, val], read) = encode_pass(opts, &tok, total)?;
    // The inputs are read three times (scan, tokenizer, encode): the encoded text must be the scanned one.
    for (now, scanned) in read.iter().zip(scan.inputs.iter().chain(&scan.val_inputs)) {
        if now.sha256 != scanned.sha256 || now.bytes != scanned.bytes {
            return Err(Error::InputChanged {
                path: now.path.clone(),
                reason: format!(
                    "it changed during the build ({} bytes when scanned, {} when encoded)",
                    scanned.bytes, now.bytes
                ),
            });
        }
    }
    for (split, stats) in [(Split::Train, &train), (Split::Val, &val)] {
        let i = idx(split);
        if stats.stories != scan.stories[i] || stats.bytes != scan.bytes[i] {
            return Err(Error::InputChanged {
                path: opts.inputs[0].clone(),
                reason: format!(
                    "{split}: the scan saw {} stories / {} bytes, the encoder {} / {}",
                    scan.stories[i], scan.bytes[i], stats.stories, stats.bytes
                ),
            });
        }
    }
    meta.train = train;
    meta.val = val;
    meta.save(&opts.out)?;
    tracing::info!(
        "built {} in {:.1}s: vocab {}, train {} tokens / {} stories, val {} tokens / {} stories",
        opts.out.display(),
        started.elapsed().as_secs_f64(),
        meta.vocab_size,
        meta.train.tokens,
        meta.train.stories,
        meta.val.tokens,
        meta.val.stories
    );
    Ok(meta)
}

/// Pass 2: train the tokenizer on the train stories.
fn train_pass(opts: &BuildOptions, scan: &Scan) -> Result<tokenizers::Tokenizer> {
    // Only the --input files are read here (never the --val-input files).
    let train_bytes = scan.inputs.iter().map(|f| f.bytes).sum::<u64>();
    tracing::info!(
        "training BPE tokenizer (vocab {}) on {} train stories",
        opts.vocab_size,
        scan.stories[idx(Split::Train)]
    );
    let corpus = Corpus {
        val_inputs: Vec::new(),
        ..opts.corpus()
    };
    let corpus = if opts.val_inputs.is_empty() {
        corpus
    } else {
        Corpus {
            // All --input stories are train: a fraction of 0 keeps every one.
            splitter: Splitter::new(opts.seed, 0.0),
            ..corpus
        }
    };
    let progress = Arc::new(Progress::new(opts.progress, "train", train_bytes));
    let failure: Arc<Mutex<Option<Error>>> = Arc::new(Mutex::new(None));
    let stream = TrainStream {
        inner: corpus.stories(),
        progress: Arc::clone(&progress),
        failure: Arc::clone(&failure),
        n: 0,
    };
    let settings = TokenizerSettings::new(opts.vocab_size, opts.min_frequency);
    let result = train_tokenizer(&settings, stream);
    progress.finish();
    if let Some(e) = failure.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(e);
    }
    result
}

/// Train stories for the trainer; an input error ends the stream and is kept in `failure`.
struct TrainStream {
    inner: SplitStories,
    progress: Arc<Progress>,
    failure: Arc<Mutex<Option<Error>>>,
    n: u64,
}

impl Iterator for TrainStream {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        loop {
            let story = match self.inner.next()? {
                Ok(s) => s,
                Err(e) => {
                    *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    return None;
                }
            };
            self.n += 1;
            if self.n & 1023 == 0 {
                self.progress
                    .set(self.inner.bytes_counter().load(Ordering::Relaxed));
            }
            if story.split == Split::Train {
                return Some(story.text);
            }
        }
    }
}

/// Pass 3: encode every story into train.bin / val.bin.
/// Encodes every story into the token files; also returns each input's size and hash as read now.
fn encode_pass(
    opts: &BuildOptions,
    tok: &tokenizers::Tokenizer,
    total: u64,
) -> Result<([SplitStats; 2], Vec<FileRecord>)> {
    tracing::info!(
        "encoding stories into {} and {}",
        Split::Train.file_name(),
        Split::Val.file_name()
    );
    let enc = story_encoder(tok);
    let mut writers = [
        TokenWriter::create(&opts.out.join(Split::Train.file_name()))?,
        TokenWriter::create(&opts.out.join(Split::Val.file_name()))?,
    ];
    let progress = Progress::new(opts.progress, "encode", total);
    let chunk_size = opts.chunk_stories.max(1);
    let mut stream = opts.corpus().stories_hashed();
    let bytes_done = stream.bytes_counter();
    let mut chunk: Vec<String> = Vec::with_capacity(chunk_size);
    let mut splits: Vec<Split> = Vec::with_capacity(chunk_size);
    let mut flush = |chunk: &mut Vec<String>, splits: &mut Vec<Split>| -> Result<()> {
        let encoded = encode_chunk(&enc, chunk)?;
        for ((tokens, story), split) in encoded.iter().zip(chunk.iter()).zip(splits.iter()) {
            writers[idx(*split)].push_story(tokens, story.len() as u64)?;
        }
        chunk.clear();
        splits.clear();
        Ok(())
    };
    for story in stream.by_ref() {
        let story = story?;
        chunk.push(story.text);
        splits.push(story.split);
        if chunk.len() >= chunk_size {
            flush(&mut chunk, &mut splits)?;
            progress.set(bytes_done.load(Ordering::Relaxed));
        }
    }
    flush(&mut chunk, &mut splits)?;
    progress.finish();
    let records = canonical_records(stream.records());
    let [train, val] = writers;
    Ok(([train.finish()?, val.finish()?], records))
}
