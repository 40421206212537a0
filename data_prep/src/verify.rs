//! `verify`: re-check a build folder against its meta.json and, if available, its inputs.
//!
//! Checks the tokenizer's hash, vocabulary size and special ids; each `.bin` file's length,
//! hash, token and story counts and that every id is below the vocabulary size; decodes every
//! story and checks the byte counts. When the input files recorded in meta.json are still
//! present (with the recorded hashes), it also re-reads them and checks that every story
//! decodes back to exactly the input story of its split.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use tokenizers::Tokenizer;

use crate::encode::TokenStoryReader;
use crate::error::{Error, Result};
use crate::fsutil::sha256_file;
use crate::meta::{Meta, SplitStats};
use crate::progress::Progress;
use crate::split::{Corpus, Split};
use crate::tokenizer::{decode_story, vocab_size_of, EOT_TOKEN, PAD_TOKEN};

/// Options of [`verify`].
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// Compare decoded stories with the input files when they are present.
    pub compare_inputs: bool,
    /// Show progress on stderr.
    pub progress: bool,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            compare_inputs: true,
            progress: false,
        }
    }
}

/// What [`verify`] checked.
#[derive(Clone, Debug)]
pub struct VerifyReport {
    /// The build's meta.json (every number in it was confirmed).
    pub meta: Meta,
    /// Whether decoded stories were compared with the input files.
    pub inputs_compared: bool,
    /// An input file that is present but no longer the one built from (then not compared).
    pub input_changed: Option<std::path::PathBuf>,
}

const CHUNK: usize = 2048;

struct Checker<'a> {
    dir: PathBuf,
    tok: &'a Tokenizer,
    readers: [TokenStoryReader; 2],
    found: [SplitStats; 2],
    progress: Progress,
}

fn idx(split: Split) -> usize {
    match split {
        Split::Train => 0,
        Split::Val => 1,
    }
}

impl Checker<'_> {
    fn fail(&self, reason: String) -> Error {
        Error::Verify {
            dir: self.dir.clone(),
            reason,
        }
    }

    fn next_ids(&mut self, split: Split) -> Result<Option<Vec<u32>>> {
        let r = &mut self.readers[idx(split)];
        r.next_story().map_err(|e| Error::Verify {
            dir: self.dir.clone(),
            reason: format!("cannot read {}: {e}", split.file_name()),
        })
    }

    /// Decodes a batch in parallel; compares with `expected` texts when given.
    fn check_batch(
        &mut self,
        batch: &[(Split, Vec<u32>)],
        expected: Option<&[String]>,
    ) -> Result<()> {
        let tok = self.tok;
        let decoded: Vec<String> = batch
            .par_iter()
            .map(|(_, ids)| decode_story(tok, ids))
            .collect::<Result<_>>()?;
        for (i, ((split, _), text)) in batch.iter().zip(&decoded).enumerate() {
            let index = self.found[idx(*split)].stories;
            if let Some(expected) = expected {
                if &expected[i] != text {
                    let at = expected[i]
                        .bytes()
                        .zip(text.bytes())
                        .take_while(|(a, b)| a == b)
                        .count();
                    return Err(self.fail(format!(
                        "{split} story #{index} decodes to text that differs from the input story at byte {at}"
                    )));
                }
            }
            let stats = &mut self.found[idx(*split)];
            stats.stories += 1;
            stats.bytes += text.len() as u64;
        }
        let done: u64 = self.readers.iter().map(|r| r.tokens() * 2).sum();
        self.progress.set(done);
        Ok(())
    }

    fn compare_with_inputs(&mut self, corpus: &Corpus) -> Result<()> {
        let mut stream = corpus.stories();
        loop {
            let mut batch = Vec::with_capacity(CHUNK);
            let mut texts = Vec::with_capacity(CHUNK);
            for story in stream.by_ref().take(CHUNK) {
                let story = story?;
                let Some(ids) = self.next_ids(story.split)? else {
                    return Err(self.fail(format!(
                        "{} holds fewer stories than the inputs' {} split",
                        story.split.file_name(),
                        story.split
                    )));
                };
                batch.push((story.split, ids));
                texts.push(story.text);
            }
            if batch.is_empty() {
                break;
            }
            self.check_batch(&batch, Some(&texts))?;
        }
        for split in Split::ALL {
            if self.next_ids(split)?.is_some() {
                return Err(self.fail(format!(
                    "{} holds more stories than the inputs' {split} split",
                    split.file_name()
                )));
            }
        }
        Ok(())
    }

    fn decode_only(&mut self) -> Result<()> {
        for split in Split::ALL {
            loop {
                let mut batch = Vec::with_capacity(CHUNK);
                while batch.len() < CHUNK {
                    match self.next_ids(split)? {
                        Some(ids) => batch.push((split, ids)),
                        None => break,
                    }
                }
                if batch.is_empty() {
                    break;
                }
                self.check_batch(&batch, None)?;
            }
        }
        Ok(())
    }
}

/// Verifies the build in `dir` (see the module docs). Fails with [`Error::Verify`] naming the
/// first mismatch.
pub fn verify(dir: &Path, opts: &VerifyOptions) -> Result<VerifyReport> {
    let meta = Meta::load(dir)?;
    let fail = |reason: String| Error::Verify {
        dir: dir.to_path_buf(),
        reason,
    };
    let tok_path = meta.tokenizer_path(dir);
    if !tok_path.is_file() {
        return Err(fail(format!("{} is missing", tok_path.display())));
    }
    if sha256_file(&tok_path)? != meta.tokenizer.sha256 {
        return Err(fail(format!(
            "{} does not have the sha256 recorded in meta.json",
            tok_path.display()
        )));
    }
    let tok = meta.load_tokenizer(dir)?;
    let vs = vocab_size_of(&tok);
    if vs != meta.vocab_size {
        return Err(fail(format!(
            "the tokenizer has {vs} tokens, meta.json says {}",
            meta.vocab_size
        )));
    }
    if tok.token_to_id(EOT_TOKEN) != Some(meta.eot_id)
        || tok.token_to_id(PAD_TOKEN) != Some(meta.pad_id)
    {
        return Err(fail("special token ids differ from meta.json".into()));
    }
    let mut total = 0;
    for split in Split::ALL {
        let path = meta.split_path(dir, split);
        let len = std::fs::metadata(&path)
            .map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?
            .len();
        let want = meta.split(split).tokens * 2;
        if len != want {
            return Err(fail(format!(
                "{} is {len} bytes, meta.json says {} tokens ({want} bytes)",
                path.display(),
                meta.split(split).tokens
            )));
        }
        total += len;
    }

    let corpus = Corpus::from_meta(&meta);
    let mut input_changed = None;
    let mut inputs_present = opts.compare_inputs
        && meta
            .inputs
            .iter()
            .chain(&meta.val_inputs)
            .all(|f| f.path.is_file());
    if inputs_present {
        tracing::info!("hashing the input files");
        for f in meta.inputs.iter().chain(&meta.val_inputs) {
            if sha256_file(&f.path)? != f.sha256 {
                // The build may still be sound: check it on its own, and say why the inputs are left out.
                tracing::warn!(
                    "input {} changed since the build (sha256 differs); checking the outputs without the inputs",
                    f.path.display()
                );
                inputs_present = false;
                input_changed = Some(f.path.clone());
                break;
            }
        }
    } else if opts.compare_inputs {
        tracing::info!("input files not found; checking the outputs without them");
    }

    let mut checker = Checker {
        dir: dir.to_path_buf(),
        tok: &tok,
        readers: [
            TokenStoryReader::open(&meta.split_path(dir, Split::Train))?,
            TokenStoryReader::open(&meta.split_path(dir, Split::Val))?,
        ],
        found: Default::default(),
        progress: Progress::new(opts.progress, "verify", total),
    };
    if inputs_present {
        checker.compare_with_inputs(&corpus)?;
    } else {
        checker.decode_only()?;
    }
    checker.progress.finish();
    let Checker { readers, found, .. } = checker;
    for (split, (reader, mut stats)) in Split::ALL.into_iter().zip(readers.into_iter().zip(found)) {
        let want = meta.split(split);
        stats.tokens = reader.tokens();
        if usize::from(reader.max_id()) >= meta.vocab_size && stats.tokens > 0 {
            return Err(fail(format!(
                "{} holds id {} >= vocab size {}",
                want.file,
                reader.max_id(),
                meta.vocab_size
            )));
        }
        stats.sha256 = reader.finish();
        stats.file = want.file.clone();
        if &stats != want {
            return Err(fail(format!(
                "{} does not match meta.json: found {} tokens / {} stories / {} bytes / sha256 {}, \
                 recorded {} / {} / {} / {}",
                want.file,
                stats.tokens,
                stats.stories,
                stats.bytes,
                stats.sha256,
                want.tokens,
                want.stories,
                want.bytes,
                want.sha256
            )));
        }
    }
    Ok(VerifyReport {
        meta,
        inputs_compared: inputs_present,
        input_changed,
    })
}
