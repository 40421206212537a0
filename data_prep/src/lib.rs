//! Data preparation for Bit-Llama Lab: TinyStories-format text in, a byte-level BPE tokenizer
//! and `u16` token files out.
//!
//! A build folder (made by [`build`] / `data_prep build`) holds:
//!
//! * `tokenizer.json`: byte-level BPE ([`tokenizer`]); `<|endoftext|>` = 0, `<|padding|>` = 1;
//! * `train.bin`, `val.bin`: little-endian `u16` token ids, every story followed by the
//!   end-of-text id ([`encode`]);
//! * `meta.json`: [`Meta`], written last: counts, bytes, hashes and settings ([`meta`]).
//!
//! Typical use from another crate:
//!
//! ```no_run
//! let dir = std::path::Path::new("data/tinystories");
//! let meta = data_prep::Meta::load(dir)?;
//! let tokenizer = meta.load_tokenizer(dir)?;
//! let train_path = meta.split_path(dir, data_prep::Split::Train);
//! assert!(meta.vocab_size <= 65536 && meta.eot_id == data_prep::EOT_ID);
//! # let _ = (tokenizer, train_path);
//! # Ok::<(), data_prep::Error>(())
//! ```

pub mod corpus;
pub mod download;
pub mod encode;
pub mod error;
pub mod fsutil;
pub mod meta;
pub mod pipeline;
mod progress;
pub mod split;
pub mod synth;
pub mod tokenizer;
pub mod verify;

pub use download::{tinystories, TinyStoriesOptions, Variant};
pub use encode::read_tokens;
pub use error::{Error, Result};
pub use fsutil::{lock_dir, DirLock};
pub use meta::{FileRecord, Meta, SplitStats, TokenizerInfo, ValSource, FORMAT_VERSION};
pub use pipeline::{build, BuildOptions};
pub use split::{Corpus, Split, Splitter};
pub use synth::synth;
pub use tokenizer::{
    load_tokenizer, TokenizerSettings, EOT_ID, EOT_TOKEN, MAX_VOCAB_SIZE, MIN_VOCAB_SIZE, PAD_ID,
    PAD_TOKEN,
};
pub use verify::{verify, VerifyOptions, VerifyReport};
