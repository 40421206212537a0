//! Memory-mapped token files and batch sampling: random training windows from a seeded RNG, and a fixed
//! set of validation windows so that every eval of every run with the same context is comparable.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use memmap2::Mmap;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// A `data_prep build` output folder opened for training.
pub struct TokenData {
    pub dir: PathBuf,
    pub meta: data_prep::Meta,
    train: Mmap,
    val: Mmap,
}

/// Token files up to this size are also checked against their sha256 before training (well under a
/// second); larger ones get the id-range pass only.
pub const HASHED_TOKEN_BYTES: usize = 128 << 20;

/// The first u16 little-endian id in `buf` that is `vocab` or more: (position, id).
fn first_id_at_or_above(buf: &[u8], vocab: usize) -> Option<(usize, usize)> {
    if vocab > u16::MAX as usize {
        return None;
    }
    // Chunked max first (vectorises), then the exact position only in a chunk that has one.
    const CHUNK: usize = 1 << 16;
    for (c, chunk) in buf.chunks(CHUNK).enumerate() {
        let max = chunk
            .chunks_exact(2)
            .map(|p| u16::from_le_bytes([p[0], p[1]]))
            .max()
            .unwrap_or(0);
        if max as usize >= vocab {
            let (i, id) = chunk
                .chunks_exact(2)
                .map(|p| u16::from_le_bytes([p[0], p[1]]) as usize)
                .enumerate()
                .find(|(_, id)| *id >= vocab)?;
            return Some((c * CHUNK / 2 + i, id));
        }
    }
    None
}

fn map(path: &Path) -> Result<Mmap> {
    let file = File::open(path).with_context(|| {
        format!(
            "cannot open {}: is data_dir a `data_prep build` output?",
            path.display()
        )
    })?;
    // SAFETY: the token files are written once by data_prep (temp file + rename) and only read here.
    let mmap = unsafe { Mmap::map(&file) }
        .with_context(|| format!("memory-mapping {}", path.display()))?;
    if mmap.len() % 2 != 0 {
        bail!(
            "{} has an odd size: not a u16 token file; rebuild it with `data_prep build`",
            path.display()
        );
    }
    Ok(mmap)
}

impl TokenData {
    /// Open `dir` (meta.json, train.bin, val.bin) and check the files agree with the meta.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("data_dir {} does not exist: create it with `data_prep build --input FILE --out {}`", dir.display(), dir.display());
        }
        let meta = data_prep::Meta::load(dir).with_context(|| {
            format!(
                "data_dir {} has no valid meta.json: run `data_prep build` into it",
                dir.display()
            )
        })?;
        let train = map(&dir.join("train.bin"))?;
        let val = map(&dir.join("val.bin"))?;
        for (name, mmap, tokens) in [
            ("train.bin", &train, meta.train.tokens),
            ("val.bin", &val, meta.val.tokens),
        ] {
            if mmap.len() as u64 != tokens * 2 {
                bail!(
                    "{}/{name} holds {} tokens but meta.json says {tokens}: the build is incomplete, rerun `data_prep build --force`",
                    dir.display(),
                    mmap.len() / 2
                );
            }
        }
        let data = Self {
            dir: dir.to_path_buf(),
            meta,
            train,
            val,
        };
        data.check_against_meta()?;
        Ok(data)
    }

    /// Before the first step, the folder must be what its `meta.json` says: the tokenizer loads, is the
    /// recorded file (sha256) and has the recorded vocab; every token id is below the vocab (one pass over
    /// the mapped files); token files up to [`HASHED_TOKEN_BYTES`] also match their recorded sha256.
    /// Otherwise a corrupt tokenizer would be copied into the run and fail generation later, an edited
    /// vocab would train the wrong model, and a bad id would fail whatever step reached it.
    fn check_against_meta(&self) -> Result<()> {
        let dir = &self.dir;
        let verify = |file: &str, what: String| -> anyhow::Error {
            anyhow::anyhow!(
                "data_dir {}: {file} {what}: check the folder with `data_prep verify {}` and rebuild it with `data_prep build --force`",
                dir.display(),
                dir.display()
            )
        };
        let meta = &self.meta;
        let tok_path = meta.tokenizer_path(dir);
        let tok_name = &meta.tokenizer.file;
        let sha = data_prep::fsutil::sha256_file(&tok_path)
            .map_err(|e| verify(tok_name, format!("cannot be read ({e})")))?;
        if sha != meta.tokenizer.sha256 {
            return Err(verify(
                tok_name,
                "is not the file meta.json records (its sha256 differs)".into(),
            ));
        }
        let tok = data_prep::tokenizer::load_tokenizer(&tok_path)
            .map_err(|e| verify(tok_name, format!("does not load ({e})")))?;
        let tok_vocab = data_prep::tokenizer::vocab_size_of(&tok);
        if tok_vocab != meta.vocab_size {
            return Err(verify(
                tok_name,
                format!(
                    "has vocab {tok_vocab} but meta.json says {}",
                    meta.vocab_size
                ),
            ));
        }
        for (stats, mmap) in [(&meta.train, &self.train), (&meta.val, &self.val)] {
            if let Some((pos, id)) = first_id_at_or_above(mmap, meta.vocab_size) {
                return Err(verify(
                    &stats.file,
                    format!(
                        "holds token id {id} at position {pos}, not below meta.json's vocab {}",
                        meta.vocab_size
                    ),
                ));
            }
            if mmap.len() <= HASHED_TOKEN_BYTES {
                use sha2::Digest;
                let got = hex::encode(sha2::Sha256::digest(&mmap[..]));
                if got != stats.sha256 {
                    return Err(verify(
                        &stats.file,
                        "is not the file meta.json records (its sha256 differs)".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn train_tokens(&self) -> usize {
        self.train.len() / 2
    }

    pub fn val_tokens(&self) -> usize {
        self.val.len() / 2
    }

    /// Refuse a context the data cannot fill.
    pub fn check_context(&self, context_len: usize) -> Result<()> {
        for (split, n) in [("train", self.train_tokens()), ("val", self.val_tokens())] {
            if n < context_len + 1 {
                bail!(
                    "context_len = {context_len} needs at least {} tokens but the {split} split of {} has {n}: lower context_len or use more data",
                    context_len + 1,
                    self.dir.display()
                );
            }
        }
        Ok(())
    }

    /// Token i of a u16 little-endian buffer.
    fn window(buf: &[u8], start: usize, len: usize, out: &mut Vec<u32>) {
        out.extend(
            buf[start * 2..(start + len) * 2]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32),
        );
    }

    /// Inputs and targets (B,T) from windows starting at `starts`.
    fn batch(buf: &[u8], starts: &[usize], t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let mut x = Vec::with_capacity(starts.len() * t);
        let mut y = Vec::with_capacity(starts.len() * t);
        let mut w = Vec::with_capacity(t + 1);
        for &s in starts {
            w.clear();
            Self::window(buf, s, t + 1, &mut w);
            x.extend_from_slice(&w[..t]);
            y.extend_from_slice(&w[1..]);
        }
        let b = starts.len();
        Ok((
            Tensor::from_vec(x, (b, t), device)?,
            Tensor::from_vec(y, (b, t), device)?,
        ))
    }

    /// Window starts of one training batch of `b` windows, drawn from `rng` (whose state is checkpointed).
    pub fn sample_starts(&self, rng: &mut ChaCha8Rng, b: usize, t: usize) -> Vec<usize> {
        let max_start = self.train_tokens() - (t + 1);
        (0..b).map(|_| rng.gen_range(0..=max_start)).collect()
    }

    /// A training batch from given window starts.
    pub fn train_batch(
        &self,
        starts: &[usize],
        t: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        Self::batch(&self.train, starts, t, device)
    }

    /// Most validation batches of `b` windows of `t + 1` tokens the val split holds without overlap: the
    /// bound on `eval_batches` (more would only score the same tokens again, for hours, in GBs).
    pub fn max_val_batches(&self, b: usize, t: usize) -> usize {
        (self.val_tokens() / ((t + 1) * b)).max(1)
    }

    /// Window starts `windows` of the fixed validation set: `n_batches` × `b` windows spread evenly over
    /// the val split.
    fn val_starts(
        &self,
        windows: std::ops::Range<usize>,
        n_batches: usize,
        b: usize,
        t: usize,
    ) -> Vec<usize> {
        let n = n_batches * b;
        let span = self.val_tokens() - (t + 1);
        windows
            .map(|i| if n > 1 { i * span / (n - 1) } else { 0 })
            .collect()
    }

    /// Validation batch `index` of the fixed set of `n_batches` (see [`Self::val_starts`]), built when it is
    /// needed: an eval holds one batch at a time.
    pub fn val_batch(
        &self,
        index: usize,
        n_batches: usize,
        b: usize,
        t: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let starts = self.val_starts(index * b..(index + 1) * b, n_batches, b, t);
        Self::batch(&self.val, &starts, t, device)
    }

    /// All the fixed validation batches at once (small sets: tests and benchmarks).
    pub fn val_batches(
        &self,
        n_batches: usize,
        b: usize,
        t: usize,
        device: &Device,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        self.val_starts(0..n_batches * b, n_batches, b, t)
            .chunks(b)
            .map(|chunk| Self::batch(&self.val, chunk, t, device))
            .collect()
    }

    /// Bits per UTF-8 byte of the val split for a mean loss in nats per token.
    pub fn bits_per_byte(&self, loss_nats: f64) -> f64 {
        self.meta.bits_per_byte(data_prep::Split::Val, loss_nats)
    }
}
