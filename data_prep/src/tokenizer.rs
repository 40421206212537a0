//! Byte-level BPE tokenizer training with the `tokenizers` crate.
//!
//! The tokenizer is GPT-2 style: no normalizer, a `ByteLevel` pre-tokenizer (GPT-2 split regex,
//! no prefix space), a BPE model whose initial alphabet is the full 256-symbol byte-level
//! alphabet (so any text encodes, no unknown token), a `ByteLevel` post-processor and decoder.
//! The special tokens `<|endoftext|>` and `<|padding|>` get ids 0 and 1. Decoding the ids of a
//! story gives back the story text exactly. The saved `tokenizer.json` is the standard format
//! and loads in Python's `tokenizers` (`Tokenizer.from_file`).

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};

/// The end-of-text token, appended after every story.
pub const EOT_TOKEN: &str = "<|endoftext|>";
/// The padding token (never written to token files; for batching).
pub const PAD_TOKEN: &str = "<|padding|>";
/// Id of [`EOT_TOKEN`].
pub const EOT_ID: u32 = 0;
/// Id of [`PAD_TOKEN`].
pub const PAD_ID: u32 = 1;
/// Smallest vocabulary: 256 byte symbols + the 2 special tokens.
pub const MIN_VOCAB_SIZE: usize = 256 + 2;
/// Largest vocabulary: ids must fit in a `u16`.
pub const MAX_VOCAB_SIZE: usize = 1 << 16;
/// Default requested vocabulary size.
pub const DEFAULT_VOCAB_SIZE: usize = 16384;
/// Default minimum pair frequency for a merge.
pub const DEFAULT_MIN_FREQUENCY: u64 = 2;

/// The exact tokenizer training settings (recorded in meta.json).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerSettings {
    /// Always `"BPE"`.
    pub model: String,
    /// The requested vocabulary size (the trained one can be smaller on a small corpus).
    pub vocab_size_requested: usize,
    /// Minimum frequency of a pair to be merged.
    pub min_frequency: u64,
    /// Special tokens, in id order.
    pub special_tokens: Vec<String>,
    /// Always `"none"`.
    pub normalizer: String,
    /// Always `"ByteLevel"`.
    pub pre_tokenizer: String,
    /// ByteLevel `add_prefix_space` (false: exact round trip).
    pub add_prefix_space: bool,
    /// ByteLevel `use_regex` (GPT-2 split pattern).
    pub use_regex: bool,
    /// Initial alphabet, always `"ByteLevel (256 symbols)"`.
    pub initial_alphabet: String,
    /// Always `"ByteLevel"`.
    pub decoder: String,
}

impl TokenizerSettings {
    /// The settings used by `data_prep build`.
    pub fn new(vocab_size: usize, min_frequency: u64) -> Self {
        TokenizerSettings {
            model: "BPE".into(),
            vocab_size_requested: vocab_size,
            min_frequency,
            special_tokens: vec![EOT_TOKEN.into(), PAD_TOKEN.into()],
            normalizer: "none".into(),
            pre_tokenizer: "ByteLevel".into(),
            add_prefix_space: false,
            use_regex: true,
            initial_alphabet: "ByteLevel (256 symbols)".into(),
            decoder: "ByteLevel".into(),
        }
    }
}

/// Checks that a requested vocabulary size is in `[MIN_VOCAB_SIZE, MAX_VOCAB_SIZE]`.
pub fn validate_vocab_size(vocab_size: usize) -> Result<()> {
    if (MIN_VOCAB_SIZE..=MAX_VOCAB_SIZE).contains(&vocab_size) {
        Ok(())
    } else {
        Err(Error::VocabSize {
            requested: vocab_size,
            min: MIN_VOCAB_SIZE,
            max: MAX_VOCAB_SIZE,
        })
    }
}

fn byte_level() -> ByteLevel {
    ByteLevel::new(false, true, true)
}

/// An untrained tokenizer with the pipeline described in the module docs.
fn empty_tokenizer() -> Tokenizer {
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(byte_level()));
    tok.with_post_processor(Some(byte_level()));
    tok.with_decoder(Some(byte_level()));
    tok
}

/// Trains a tokenizer on a stream of stories.
///
/// Memory is bounded by the number of distinct pre-tokenized words, not by the corpus size.
pub fn train_tokenizer<I>(settings: &TokenizerSettings, stories: I) -> Result<Tokenizer>
where
    I: Iterator<Item = String> + Send,
{
    validate_vocab_size(settings.vocab_size_requested)?;
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(settings.vocab_size_requested)
        .min_frequency(settings.min_frequency)
        .show_progress(false)
        .special_tokens(
            settings
                .special_tokens
                .iter()
                .map(|t| AddedToken::from(t.clone(), true))
                .collect(),
        )
        .initial_alphabet(alphabet)
        .build()
        .into();
    let mut tok = empty_tokenizer();
    tok.train(&mut trainer, stories)
        .map_err(|e| Error::tokenizer("training the BPE tokenizer", e))?;
    check_special_ids(&tok)?;
    Ok(tok)
}

fn check_special_ids(tok: &Tokenizer) -> Result<()> {
    for (token, id) in [(EOT_TOKEN, EOT_ID), (PAD_TOKEN, PAD_ID)] {
        let got = tok.token_to_id(token);
        if got != Some(id) {
            return Err(Error::Tokenizer {
                context: "checking special tokens".into(),
                reason: format!("{token} has id {got:?}, expected {id}"),
            });
        }
    }
    Ok(())
}

/// The vocabulary size of a tokenizer: one more than its largest id.
pub fn vocab_size_of(tok: &Tokenizer) -> usize {
    tok.get_vocab(true)
        .values()
        .copied()
        .max()
        .map_or(0, |m| m as usize + 1)
}

/// Loads a `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path)
        .map_err(|e| Error::tokenizer(format!("loading {}", path.display()), e))
}

/// A copy of `tok` that encodes text literally: `<|endoftext|>` written inside a story is
/// encoded as ordinary text, so the end-of-text id only ever comes from the appended marker.
pub fn story_encoder(tok: &Tokenizer) -> Tokenizer {
    let mut enc = tok.clone();
    enc.set_encode_special_tokens(true);
    enc
}

/// Encodes one story (without the end-of-text id) using a tokenizer from [`story_encoder`].
pub fn encode_story(enc: &Tokenizer, story: &str) -> Result<Vec<u32>> {
    enc.encode_fast(story, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| Error::tokenizer("encoding a story", e))
}

/// Decodes the ids of one story (without its end-of-text id) back to text.
pub fn decode_story(tok: &Tokenizer, ids: &[u32]) -> Result<String> {
    tok.decode(ids, false)
        .map_err(|e| Error::tokenizer("decoding a story", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        (0..50)
            .map(|i| format!("Story {i}: the cat sat on the mat. “Hi!” said Tom — café {i}."))
            .collect()
    }

    #[test]
    fn trains_with_special_ids_and_round_trips() {
        let settings = TokenizerSettings::new(300, 2);
        let tok = train_tokenizer(&settings, corpus().into_iter()).unwrap();
        assert_eq!(tok.token_to_id(EOT_TOKEN), Some(0));
        assert_eq!(tok.token_to_id(PAD_TOKEN), Some(1));
        let vs = vocab_size_of(&tok);
        assert!((MIN_VOCAB_SIZE..=300).contains(&vs), "{vs}");
        let enc = story_encoder(&tok);
        for text in [
            "The cat sat.\nNew line  two spaces",
            "Unseen 日本語 ✓ \t tab",
            "literal <|endoftext|> inside",
        ] {
            let ids = encode_story(&enc, text).unwrap();
            assert!(!ids.contains(&EOT_ID), "{text}");
            assert!(ids.iter().all(|&i| (i as usize) < vs));
            assert_eq!(decode_story(&tok, &ids).unwrap(), text);
        }
    }

    #[test]
    fn vocab_bounds() {
        assert!(validate_vocab_size(257).is_err());
        assert!(validate_vocab_size(258).is_ok());
        assert!(validate_vocab_size(65536).is_ok());
        assert!(validate_vocab_size(65537).is_err());
    }
}
