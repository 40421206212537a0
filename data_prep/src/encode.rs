//! Token files: parallel chunk encoding, crash-safe `.bin` writing and streaming reading.
//!
//! A `.bin` file is a flat array of little-endian `u16` token ids; every story is followed by
//! the end-of-text id ([`crate::EOT_ID`]).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use rayon::prelude::*;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use crate::error::{Error, IoContext, Result};
use crate::fsutil::AtomicFile;
use crate::meta::SplitStats;
use crate::tokenizer::{encode_story, EOT_ID};

/// Encodes stories in parallel (order kept), each followed by the end-of-text id, as `u16`.
///
/// `enc` should come from [`crate::tokenizer::story_encoder`].
pub fn encode_chunk(enc: &Tokenizer, stories: &[String]) -> Result<Vec<Vec<u16>>> {
    stories
        .par_iter()
        .map(|story| {
            let ids = encode_story(enc, story)?;
            let mut out = Vec::with_capacity(ids.len() + 1);
            for id in ids {
                out.push(u16::try_from(id).map_err(|_| Error::Tokenizer {
                    context: "encoding a story".into(),
                    reason: format!("token id {id} does not fit in u16"),
                })?);
            }
            out.push(EOT_ID as u16);
            Ok(out)
        })
        .collect()
}

/// Appends stories' tokens to a `.bin` file written under a temporary name.
pub struct TokenWriter {
    file: AtomicFile,
    hasher: Sha256,
    stats: SplitStats,
    buf: Vec<u8>,
}

impl TokenWriter {
    /// Starts writing `dest` (as `dest.tmp` until [`TokenWriter::finish`]).
    pub fn create(dest: &Path) -> Result<Self> {
        let file_name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(TokenWriter {
            file: AtomicFile::create(dest)?,
            hasher: Sha256::new(),
            stats: SplitStats {
                file: file_name,
                ..SplitStats::default()
            },
            buf: Vec::new(),
        })
    }

    /// Appends one story's tokens (end-of-text included); `story_bytes` is its UTF-8 length.
    pub fn push_story(&mut self, tokens: &[u16], story_bytes: u64) -> Result<()> {
        self.buf.clear();
        self.buf.reserve(tokens.len() * 2);
        for t in tokens {
            self.buf.extend_from_slice(&t.to_le_bytes());
        }
        self.hasher.update(&self.buf);
        self.file.append(&self.buf)?;
        self.stats.tokens += tokens.len() as u64;
        self.stats.stories += 1;
        self.stats.bytes += story_bytes;
        Ok(())
    }

    /// Counts so far.
    pub fn stats(&self) -> &SplitStats {
        &self.stats
    }

    /// Fsyncs, renames into place and returns the file's statistics.
    pub fn finish(self) -> Result<SplitStats> {
        let mut stats = self.stats;
        stats.sha256 = hex::encode(self.hasher.finalize());
        self.file.commit()?;
        Ok(stats)
    }
}

/// Reads a whole `.bin` file into memory (for small files; tests and tools).
pub fn read_tokens(path: &Path) -> Result<Vec<u16>> {
    let bytes = std::fs::read(path).ctx(|| format!("cannot read {}", path.display()))?;
    if bytes.len() % 2 != 0 {
        return Err(Error::io(
            format!("{} is not a u16 token file", path.display()),
            std::io::Error::other(format!("odd length {}", bytes.len())),
        ));
    }
    Ok(bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect())
}

/// Splits a token sequence into stories at the end-of-text id (the ids of each story, without
/// it). Trailing ids without a final end-of-text id form a last story.
pub fn split_stories(tokens: &[u16]) -> Vec<Vec<u32>> {
    let mut out: Vec<Vec<u32>> = tokens
        .split(|&t| u32::from(t) == EOT_ID)
        .map(|s| s.iter().map(|&t| u32::from(t)).collect())
        .collect();
    if tokens.last().map(|&t| u32::from(t)) == Some(EOT_ID) || tokens.is_empty() {
        out.pop();
    }
    out
}

/// Streams a `.bin` file story by story, hashing and counting as it goes.
pub struct TokenStoryReader {
    reader: BufReader<File>,
    hasher: Sha256,
    tokens: u64,
    max_id: u16,
    /// First byte of a token split across two buffer fills.
    carry: Option<u8>,
}

impl TokenStoryReader {
    /// Opens a token file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).ctx(|| format!("cannot open {}", path.display()))?;
        Ok(TokenStoryReader {
            reader: BufReader::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
            tokens: 0,
            max_id: 0,
            carry: None,
        })
    }

    /// The ids of the next story (without its end-of-text id), or `None` at the end.
    ///
    /// Fails on an odd file length; a final story without end-of-text is returned as is
    /// (callers compare story counts with meta.json).
    pub fn next_story(&mut self) -> std::io::Result<Option<Vec<u32>>> {
        let TokenStoryReader {
            reader,
            hasher,
            tokens,
            max_id,
            carry,
        } = self;
        let mut story = Vec::new();
        // Returns true at the end-of-text id.
        let mut take = |t: u16, story: &mut Vec<u32>| {
            *tokens += 1;
            *max_id = (*max_id).max(t);
            if u32::from(t) == EOT_ID {
                return true;
            }
            story.push(u32::from(t));
            false
        };
        loop {
            let buf = reader.fill_buf()?;
            if buf.is_empty() {
                if carry.is_some() {
                    return Err(std::io::Error::other("odd file length (not u16 tokens)"));
                }
                return Ok((!story.is_empty()).then_some(story));
            }
            let mut i = 0;
            let mut ended = false;
            if let Some(lo) = carry.take() {
                i = 1;
                ended = take(u16::from_le_bytes([lo, buf[0]]), &mut story);
            }
            while !ended && i + 1 < buf.len() {
                ended = take(u16::from_le_bytes([buf[i], buf[i + 1]]), &mut story);
                i += 2;
            }
            if !ended && i < buf.len() {
                *carry = Some(buf[i]);
                i += 1;
            }
            hasher.update(&buf[..i]);
            reader.consume(i);
            if ended {
                return Ok(Some(story));
            }
        }
    }

    /// Tokens read so far.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Largest id read so far.
    pub fn max_id(&self) -> u16 {
        self.max_id
    }

    /// SHA-256 of everything read (the whole file once `next_story` returned `None`).
    pub fn finish(self) -> String {
        hex::encode(self.hasher.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_and_readers_agree() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        let mut w = TokenWriter::create(&path).unwrap();
        w.push_story(&[5, 6, 0], 3).unwrap();
        w.push_story(&[300, 0], 2).unwrap();
        assert!(!path.exists());
        let stats = w.finish().unwrap();
        assert_eq!((stats.tokens, stats.stories, stats.bytes), (5, 2, 5));
        assert_eq!(stats.file, "t.bin");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 10);
        assert_eq!(
            stats.sha256,
            crate::fsutil::sha256_file(&path).unwrap(),
            "hash while writing = hash of file"
        );
        let toks = read_tokens(&path).unwrap();
        assert_eq!(toks, vec![5, 6, 0, 300, 0]);
        assert_eq!(split_stories(&toks), vec![vec![5, 6], vec![300]]);
        let mut r = TokenStoryReader::open(&path).unwrap();
        assert_eq!(r.next_story().unwrap(), Some(vec![5, 6]));
        assert_eq!(r.next_story().unwrap(), Some(vec![300]));
        assert_eq!(r.next_story().unwrap(), None);
        assert_eq!((r.tokens(), r.max_id()), (5, 300));
        assert_eq!(r.finish(), stats.sha256);
    }
}
