//! `meta.json`: what a build folder holds and how it was made.
//!
//! A build folder contains `tokenizer.json`, `train.bin`, `val.bin` (little-endian `u16` token
//! ids; every story is followed by the end-of-text id) and `meta.json`, written last. If
//! `meta.json` is present, the other files are complete and match it.
//!
//! **Bytes.** [`SplitStats::bytes`] counts the UTF-8 bytes of the story texts as they were
//! encoded (trimmed; lines joined with `\n`). Separators, the line breaks around them and the
//! end-of-text tokens count zero bytes. Bits per byte for a split is therefore
//! `total loss in nats over all tokens (end-of-text included) / ln 2 / bytes`; see
//! [`Meta::bits_per_byte`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::split::Split;
use crate::tokenizer::TokenizerSettings;

/// Version of the build-folder layout described by [`Meta`].
pub const FORMAT_VERSION: u32 = 1;
/// Metadata file name inside a build folder.
pub const META_FILE: &str = "meta.json";
/// Tokenizer file name inside a build folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Training tokens file name.
pub const TRAIN_FILE: &str = "train.bin";
/// Validation tokens file name.
pub const VAL_FILE: &str = "val.bin";
/// How token ids are stored in the `.bin` files.
pub const TOKEN_DTYPE: &str = "u16le";
/// The definition of [`SplitStats::bytes`], recorded in every meta.json.
pub const BYTES_DEFINITION: &str =
    "UTF-8 bytes of the trimmed story texts; separators and end-of-text tokens count 0";

/// Contents of `meta.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// Layout version ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// The program that wrote the build, e.g. `data_prep 0.1.0`.
    pub created_by: String,
    /// Size of the trained vocabulary (every id in the `.bin` files is below it).
    pub vocab_size: usize,
    /// Id of `<|endoftext|>`, appended after every story (0).
    pub eot_id: u32,
    /// Id of `<|padding|>` (1); never written to the `.bin` files.
    pub pad_id: u32,
    /// Storage type of token ids ([`TOKEN_DTYPE`]).
    pub token_dtype: String,
    /// What [`SplitStats::bytes`] counts ([`BYTES_DEFINITION`]).
    pub bytes_definition: String,
    /// Seed of the train/val split.
    pub seed: u64,
    /// Fraction of `--input` stories sent to val (unused when `val_source` is `val_input`).
    pub val_fraction: f64,
    /// Where the val stories came from.
    pub val_source: ValSource,
    /// The story separator of the inputs.
    pub separator: String,
    /// The tokenizer file and the exact training settings.
    pub tokenizer: TokenizerInfo,
    /// The `--input` files (canonical paths), sizes and SHA-256.
    pub inputs: Vec<FileRecord>,
    /// The `--val-input` files, if any.
    pub val_inputs: Vec<FileRecord>,
    /// Statistics of `train.bin`.
    pub train: SplitStats,
    /// Statistics of `val.bin`.
    pub val: SplitStats,
}

/// How the validation split was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValSource {
    /// Split off the `--input` stories by seed and `val_fraction`.
    Split,
    /// Taken from `--val-input` files.
    ValInput,
}

/// The tokenizer file and how it was trained.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// File name inside the build folder ([`TOKENIZER_FILE`]).
    pub file: String,
    /// SHA-256 of that file.
    pub sha256: String,
    /// Training settings.
    #[serde(flatten)]
    pub settings: TokenizerSettings,
}

/// An input file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Canonical path at build time.
    pub path: PathBuf,
    /// Size in bytes.
    pub bytes: u64,
    /// Lower-case hex SHA-256.
    pub sha256: String,
}

/// One token file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitStats {
    /// File name inside the build folder.
    pub file: String,
    /// Number of `u16` tokens (file length / 2), end-of-text tokens included.
    pub tokens: u64,
    /// Number of stories (= number of end-of-text tokens).
    pub stories: u64,
    /// UTF-8 bytes of the story texts (see the module docs).
    pub bytes: u64,
    /// SHA-256 of the file.
    pub sha256: String,
}

impl Meta {
    /// Reads and checks `dir/meta.json`.
    pub fn load(dir: impl AsRef<Path>) -> Result<Meta> {
        let path = dir.as_ref().join(META_FILE);
        let bad = |reason: String| Error::Meta {
            path: path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let meta: Meta =
            serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        if meta.format_version != FORMAT_VERSION {
            return Err(bad(format!(
                "format_version {} is not the supported {FORMAT_VERSION}",
                meta.format_version
            )));
        }
        Ok(meta)
    }

    /// Writes `dir/meta.json` crash-safely.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let mut json = serde_json::to_string_pretty(self).expect("Meta serializes");
        json.push('\n');
        crate::fsutil::write_atomic(&dir.as_ref().join(META_FILE), json.as_bytes())
    }

    /// Statistics of one split.
    pub fn split(&self, split: Split) -> &SplitStats {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    /// Path of a split's token file inside `dir`.
    pub fn split_path(&self, dir: impl AsRef<Path>, split: Split) -> PathBuf {
        dir.as_ref().join(&self.split(split).file)
    }

    /// Path of the tokenizer inside `dir`.
    pub fn tokenizer_path(&self, dir: impl AsRef<Path>) -> PathBuf {
        dir.as_ref().join(&self.tokenizer.file)
    }

    /// Loads the build's tokenizer (`dir/tokenizer.json`).
    pub fn load_tokenizer(&self, dir: impl AsRef<Path>) -> Result<tokenizers::Tokenizer> {
        crate::tokenizer::load_tokenizer(&self.tokenizer_path(dir))
    }

    /// Bits per byte of a split given the mean loss in nats per token over the whole split
    /// (end-of-text tokens included): `mean_nats * tokens / ln 2 / bytes`.
    pub fn bits_per_byte(&self, split: Split, mean_nats_per_token: f64) -> f64 {
        let s = self.split(split);
        mean_nats_per_token * s.tokens as f64 / std::f64::consts::LN_2 / s.bytes.max(1) as f64
    }

    /// Why `other` (requested) is a different build than `self` (existing); `None` if inputs
    /// and settings match.
    ///
    /// Compares the input hashes and every setting that changes the outputs; paths and output
    /// hashes are not compared.
    pub fn build_difference(&self, other: &Meta) -> Option<String> {
        let mut diffs = Vec::new();
        if self.format_version != other.format_version {
            diffs.push(format!(
                "format_version: existing {}, requested {}",
                self.format_version, other.format_version
            ));
        }
        if let Some(d) = self.settings_difference(other) {
            diffs.push(d);
        }
        let hashes = |v: &[FileRecord]| v.iter().map(|f| f.sha256.clone()).collect::<Vec<_>>();
        if hashes(&self.inputs) != hashes(&other.inputs) {
            diffs.push("the --input files differ (sha256)".into());
        }
        if hashes(&self.val_inputs) != hashes(&other.val_inputs) {
            diffs.push("the --val-input files differ (sha256)".into());
        }
        (!diffs.is_empty()).then(|| diffs.join(", "))
    }

    /// Like [`Meta::build_difference`] but ignoring input contents.
    pub fn settings_difference(&self, other: &Meta) -> Option<String> {
        let mut diffs = Vec::new();
        let a = &self.tokenizer.settings;
        let b = &other.tokenizer.settings;
        if a.vocab_size_requested != b.vocab_size_requested {
            diffs.push(format!(
                "vocab size: existing {}, requested {}",
                a.vocab_size_requested, b.vocab_size_requested
            ));
        } else if a != b {
            diffs.push("tokenizer settings differ".into());
        }
        // Seed and fraction decide the split only when val is split off the inputs.
        let split = self.val_source == ValSource::Split && other.val_source == ValSource::Split;
        if split && self.seed != other.seed {
            diffs.push(format!(
                "seed: existing {}, requested {}",
                self.seed, other.seed
            ));
        }
        if split && self.val_fraction != other.val_fraction {
            diffs.push(format!(
                "val fraction: existing {}, requested {}",
                self.val_fraction, other.val_fraction
            ));
        }
        if self.val_source != other.val_source {
            diffs.push("val source differs (--val-input given or not)".into());
        }
        if self.separator != other.separator {
            diffs.push(format!(
                "separator: existing {:?}, requested {:?}",
                self.separator, other.separator
            ));
        }
        if self.inputs.len() != other.inputs.len()
            || self.val_inputs.len() != other.val_inputs.len()
        {
            diffs.push("number of input files differs".into());
        }
        (!diffs.is_empty()).then(|| diffs.join(", "))
    }
}
