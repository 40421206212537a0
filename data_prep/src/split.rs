//! Deterministic, streaming train/val assignment and the story stream over all input files.
//!
//! Without `--val-input`, the stories of the `--input` files (taken in order, as one sequence;
//! empty stories do not count) get indices 0, 1, 2, ... and story `i` goes to val when
//! `u(seed, i) < val_fraction`, where `u` is a SplitMix64 hash of `(seed, i)` mapped to
//! `[0, 1)`. The decision needs nothing but the index, so the split streams and is the same on
//! every run and machine. With `--val-input`, every `--input` story is train and every
//! `--val-input` story is val.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::corpus::{buffered, open_input, StoryReader};
use crate::error::Result;
use crate::fsutil::HashingReader;
use crate::meta::{FileRecord, Meta, ValSource};

/// One of the two output splits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training tokens (`train.bin`).
    Train,
    /// Validation tokens (`val.bin`).
    Val,
}

impl Split {
    /// Both splits, train first.
    pub const ALL: [Split; 2] = [Split::Train, Split::Val];

    /// `"train"` or `"val"`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }

    /// The token file's name inside a build folder (`train.bin` / `val.bin`).
    pub fn file_name(self) -> &'static str {
        match self {
            Split::Train => crate::meta::TRAIN_FILE,
            Split::Val => crate::meta::VAL_FILE,
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Decides the split of a story from its index alone.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Splitter {
    seed: u64,
    val_fraction: f64,
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Splitter {
    /// A splitter sending about `val_fraction` of the stories to val.
    pub fn new(seed: u64, val_fraction: f64) -> Self {
        Splitter { seed, val_fraction }
    }

    /// The split of story `index` (0-based over the non-empty stories of all `--input` files).
    pub fn assign(&self, index: u64) -> Split {
        let h = splitmix64(splitmix64(self.seed) ^ index);
        let u = (h >> 11) as f64 / (1u64 << 53) as f64;
        if u < self.val_fraction {
            Split::Val
        } else {
            Split::Train
        }
    }
}

/// What a file contributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Stories are split by the [`Splitter`].
    Mixed,
    /// Every story is train (there are `--val-input` files).
    Train,
    /// Every story is val (a `--val-input` file).
    Val,
}

/// The inputs of a build and how they are split: produces the story stream every pass reads.
#[derive(Clone, Debug)]
pub struct Corpus {
    /// `--input` files, in order.
    pub inputs: Vec<PathBuf>,
    /// `--val-input` files, in order (empty: val is split off the inputs).
    pub val_inputs: Vec<PathBuf>,
    /// The story separator.
    pub separator: String,
    /// Used when `val_inputs` is empty.
    pub splitter: Splitter,
}

/// A story with its split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Story {
    /// Where it goes.
    pub split: Split,
    /// The trimmed story text.
    pub text: String,
}

impl Corpus {
    /// The corpus a finished build was made from (paths as recorded in its meta.json).
    pub fn from_meta(meta: &Meta) -> Self {
        Corpus {
            inputs: meta.inputs.iter().map(|f| f.path.clone()).collect(),
            val_inputs: meta.val_inputs.iter().map(|f| f.path.clone()).collect(),
            separator: meta.separator.clone(),
            splitter: Splitter::new(meta.seed, meta.val_fraction),
        }
    }

    /// How the val split is obtained.
    pub fn val_source(&self) -> ValSource {
        if self.val_inputs.is_empty() {
            ValSource::Split
        } else {
            ValSource::ValInput
        }
    }

    /// Streams every story of every file, in order, with its split.
    pub fn stories(&self) -> SplitStories {
        self.stream(false)
    }

    /// Like [`Corpus::stories`], also hashing every file (see [`SplitStories::records`]).
    pub fn stories_hashed(&self) -> SplitStories {
        self.stream(true)
    }

    /// Reads all stories of one split into memory. For small corpora (tests, tools).
    pub fn collect_split(&self, split: Split) -> Result<Vec<String>> {
        self.stories()
            .filter_map(|s| match s {
                Ok(s) if s.split == split => Some(Ok(s.text)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect()
    }

    fn stream(&self, hash: bool) -> SplitStories {
        let mixed = if self.val_inputs.is_empty() {
            Role::Mixed
        } else {
            Role::Train
        };
        let files = self
            .inputs
            .iter()
            .map(|p| (p.clone(), mixed))
            .chain(self.val_inputs.iter().map(|p| (p.clone(), Role::Val)))
            .collect();
        SplitStories {
            files,
            next_file: 0,
            current: None,
            separator: self.separator.clone(),
            splitter: self.splitter,
            index: 0,
            hash,
            bytes_done: Arc::new(AtomicU64::new(0)),
            bytes_finished_files: 0,
            records: Vec::new(),
            failed: false,
        }
    }
}

struct OpenFile {
    path: PathBuf,
    role: Role,
    reader: StoryReader<BufReader<HashingReader<File>>>,
}

/// Iterator over the stories of a [`Corpus`]; yields `Err` once and then ends on a bad input.
pub struct SplitStories {
    files: Vec<(PathBuf, Role)>,
    next_file: usize,
    current: Option<OpenFile>,
    separator: String,
    splitter: Splitter,
    index: u64,
    hash: bool,
    bytes_done: Arc<AtomicU64>,
    bytes_finished_files: u64,
    records: Vec<FileRecord>,
    failed: bool,
}

impl SplitStories {
    /// A shared counter of raw input bytes consumed so far (for progress from other threads).
    pub fn bytes_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.bytes_done)
    }

    /// Size and SHA-256 of every file read to its end, in order. Hashes are empty strings
    /// unless the stream came from [`Corpus::stories_hashed`].
    pub fn records(&self) -> &[FileRecord] {
        &self.records
    }

    fn advance(&mut self) -> Result<Option<Story>> {
        loop {
            if self.current.is_none() {
                let Some((path, role)) = self.files.get(self.next_file).cloned() else {
                    return Ok(None);
                };
                self.next_file += 1;
                let file = open_input(&path)?;
                let reader = StoryReader::new(
                    buffered(HashingReader::new(file)),
                    path.clone(),
                    &self.separator,
                );
                self.current = Some(OpenFile { path, role, reader });
            }
            let cur = self.current.as_mut().expect("just opened");
            let story = cur.reader.next_story()?;
            self.bytes_done.store(
                self.bytes_finished_files + cur.reader.bytes_read(),
                Ordering::Relaxed,
            );
            match story {
                Some(text) => {
                    let split = match cur.role {
                        Role::Train => Split::Train,
                        Role::Val => Split::Val,
                        Role::Mixed => {
                            let s = self.splitter.assign(self.index);
                            self.index += 1;
                            s
                        }
                    };
                    return Ok(Some(Story { split, text }));
                }
                None => {
                    let done = self.current.take().expect("current file");
                    let (sha256, bytes) = done.reader.into_inner().into_inner().finish();
                    self.bytes_finished_files += bytes;
                    self.records.push(FileRecord {
                        path: done.path,
                        bytes,
                        sha256: if self.hash { sha256 } else { String::new() },
                    });
                }
            }
        }
    }
}

impl Iterator for SplitStories {
    type Item = Result<Story>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.advance() {
            Ok(s) => s.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_deterministic_and_close_to_fraction() {
        let a = Splitter::new(7, 0.1);
        let b = Splitter::new(7, 0.1);
        let va: Vec<Split> = (0..10_000).map(|i| a.assign(i)).collect();
        let vb: Vec<Split> = (0..10_000).map(|i| b.assign(i)).collect();
        assert_eq!(va, vb);
        let val = va.iter().filter(|s| **s == Split::Val).count();
        assert!((800..1200).contains(&val), "val count {val}");
    }

    #[test]
    fn seed_changes_the_split_and_extremes_are_exact() {
        let a: Vec<Split> = (0..200).map(|i| Splitter::new(1, 0.5).assign(i)).collect();
        let b: Vec<Split> = (0..200).map(|i| Splitter::new(2, 0.5).assign(i)).collect();
        assert_ne!(a, b);
        assert!((0..1000).all(|i| Splitter::new(3, 0.0).assign(i) == Split::Train));
        assert!((0..1000).all(|i| Splitter::new(3, 1.0).assign(i) == Split::Val));
    }

    #[test]
    fn corpus_streams_files_in_order_with_roles() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.txt");
        let v = dir.path().join("v.txt");
        std::fs::write(&a, "a1\n<|endoftext|>\na2\n<|endoftext|>\n").unwrap();
        std::fs::write(&v, "v1\n<|endoftext|>\n").unwrap();
        let corpus = Corpus {
            inputs: vec![a.clone()],
            val_inputs: vec![v.clone()],
            separator: "<|endoftext|>".into(),
            splitter: Splitter::new(0, 0.5),
        };
        let mut stream = corpus.stories_hashed();
        let got: Vec<Story> = stream.by_ref().collect::<Result<_>>().unwrap();
        let texts: Vec<(Split, &str)> = got.iter().map(|s| (s.split, s.text.as_str())).collect();
        assert_eq!(
            texts,
            vec![
                (Split::Train, "a1"),
                (Split::Train, "a2"),
                (Split::Val, "v1")
            ]
        );
        let recs = stream.records();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].sha256, crate::fsutil::sha256_file(&a).unwrap());
        assert_eq!(recs[1].bytes, std::fs::metadata(&v).unwrap().len());
        assert_eq!(corpus.collect_split(Split::Val).unwrap(), vec!["v1"]);
    }
}
