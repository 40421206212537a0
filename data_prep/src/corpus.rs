//! Streaming story reader for the TinyStories `.txt` format.
//!
//! Stories are separated by the separator (default `<|endoftext|>`), normally on a line of its
//! own. Rules, applied line by line so memory stays bounded by the longest story (a line longer
//! than [`READ_CHUNK`] — a file with no line breaks at all — is handed over piece by piece, each
//! piece ending right after a separator):
//!
//! * line endings `\n`, `\r\n` and a lone `\r` are all accepted; a story's lines are joined
//!   with `\n`;
//! * a UTF-8 byte-order mark at the start of the file is dropped;
//! * every occurrence of the separator ends the current story, also inside a line (text before
//!   it ends the story, text after it starts the next one), so a story never contains it;
//! * each story is trimmed of surrounding whitespace, and empty stories are skipped;
//! * text after the last separator is a story too (a final separator is optional);
//! * an empty file, a file without any separator, invalid UTF-8 and a story longer than
//!   [`MAX_STORY_BYTES`] are errors.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Longest story accepted (bytes). Far above any real story; it stops a file with a wrong
/// separator from being read into memory as one giant "story".
pub const MAX_STORY_BYTES: usize = 16 << 20;

/// Most bytes read at once while looking for the end of a line.
pub const READ_CHUNK: usize = 1 << 20;

/// Reads stories one at a time from a [`BufRead`].
pub struct StoryReader<R> {
    reader: R,
    path: PathBuf,
    separator: String,
    line: Vec<u8>,
    line_no: u64,
    /// Whether the start of the file (where a byte-order mark may be) was handled.
    past_bom: bool,
    bytes_read: u64,
    separators: u64,
    current: String,
    ready: VecDeque<String>,
    done: bool,
}

impl StoryReader<BufReader<File>> {
    /// Opens `path` for reading stories.
    pub fn open(path: &Path, separator: &str) -> Result<Self> {
        let file = open_input(path)?;
        Ok(StoryReader::new(
            BufReader::with_capacity(1 << 20, file),
            path,
            separator,
        ))
    }
}

/// Opens an input file, mapping failures (missing file, folder, permissions) to
/// [`Error::InputUnreadable`].
pub fn open_input(path: &Path) -> Result<File> {
    let unreadable = |err| Error::InputUnreadable {
        path: path.to_path_buf(),
        err,
    };
    let file = File::open(path).map_err(unreadable)?;
    let md = file.metadata().map_err(unreadable)?;
    if md.is_dir() {
        return Err(unreadable(std::io::Error::other(
            "it is a folder, not a file",
        )));
    }
    Ok(file)
}

impl<R: BufRead> StoryReader<R> {
    /// Wraps `reader`; `path` is only used in error messages.
    pub fn new(reader: R, path: impl Into<PathBuf>, separator: &str) -> Self {
        StoryReader {
            reader,
            path: path.into(),
            separator: separator.to_owned(),
            line: Vec::new(),
            line_no: 0,
            past_bom: false,
            bytes_read: 0,
            separators: 0,
            current: String::new(),
            ready: VecDeque::new(),
            done: false,
        }
    }

    /// Raw bytes consumed so far (for progress).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Separators seen so far.
    pub fn separators_seen(&self) -> u64 {
        self.separators
    }

    /// Gives back the underlying reader.
    pub fn into_inner(self) -> R {
        self.reader
    }

    /// The next non-empty, trimmed story, or `None` at the end of the input.
    pub fn next_story(&mut self) -> Result<Option<String>> {
        loop {
            if let Some(story) = self.ready.pop_front() {
                return Ok(Some(story));
            }
            if self.done {
                return Ok(None);
            }
            // `line` may already hold the unfinished rest of a long line (see below).
            let n = (&mut self.reader)
                .take(READ_CHUNK as u64)
                .read_until(b'\n', &mut self.line)
                .map_err(|err| Error::InputUnreadable {
                    path: self.path.clone(),
                    err,
                })?;
            self.bytes_read += n as u64;
            if n == 0 && self.line.is_empty() {
                self.done = true;
                if self.bytes_read == 0 {
                    return Err(Error::EmptyInput {
                        path: self.path.clone(),
                        separator: self.separator.clone(),
                    });
                }
                if self.separators == 0 {
                    return Err(Error::NoSeparator {
                        path: self.path.clone(),
                        separator: self.separator.clone(),
                    });
                }
                self.finish_story();
                continue;
            }
            let line = std::mem::take(&mut self.line);
            if n == 0 || line.ends_with(b"\n") {
                // A whole line (the last one may lack its line break).
                self.line_no += 1;
                let result = self.take_line(&line, self.line_no);
                self.line = line;
                self.line.clear();
                result?;
                continue;
            }
            // A line longer than READ_CHUNK: hand over the text up to its last separator (a
            // character boundary), keep the rest and read on. Without a separator the line grows
            // until it is a story too long.
            let cut = last_split_end(&line, self.separator.as_bytes());
            self.line = line;
            match cut {
                Some(end) => {
                    let piece = self.line[..end].to_vec();
                    self.line.drain(..end);
                    self.take_line(&piece, self.line_no + 1)?;
                }
                None if self.current.len() + self.line.len() > MAX_STORY_BYTES => {
                    self.done = true;
                    return Err(Error::StoryTooLong {
                        path: self.path.clone(),
                        line: self.line_no + 1,
                        limit: MAX_STORY_BYTES,
                        separator: self.separator.clone(),
                    });
                }
                None => {}
            }
        }
    }

    /// Takes a line (or a piece of a long line ending right after a separator), numbered `line_no`.
    fn take_line(&mut self, raw: &[u8], line_no: u64) -> Result<()> {
        let mut bytes = raw;
        if let Some(b) = bytes.strip_suffix(b"\n") {
            bytes = b;
        }
        if let Some(b) = bytes.strip_suffix(b"\r") {
            bytes = b;
        }
        if !self.past_bom {
            self.past_bom = true;
            if let Some(b) = bytes.strip_prefix("\u{feff}".as_bytes()) {
                bytes = b;
            }
        }
        let text = std::str::from_utf8(bytes).map_err(|_| Error::InvalidUtf8 {
            path: self.path.clone(),
            line: line_no,
        })?;
        // Old Mac line breaks (a lone \r) inside what `read_until` saw as one line.
        let text: std::borrow::Cow<str> = if text.contains('\r') {
            text.replace("\r\n", "\n").replace('\r', "\n").into()
        } else {
            text.into()
        };
        let separator = std::mem::take(&mut self.separator);
        for (i, part) in text.split(separator.as_str()).enumerate() {
            if i > 0 {
                self.separators += 1;
                self.finish_story();
            }
            if !self.current.is_empty() {
                self.current.push('\n');
            }
            self.current.push_str(part);
        }
        self.separator = separator;
        if self.current.len() > MAX_STORY_BYTES {
            self.done = true;
            return Err(Error::StoryTooLong {
                path: self.path.clone(),
                line: line_no,
                limit: MAX_STORY_BYTES,
                separator: self.separator.clone(),
            });
        }
        Ok(())
    }

    fn finish_story(&mut self) {
        let trimmed = self.current.trim();
        if !trimmed.is_empty() {
            self.ready.push_back(trimmed.to_owned());
        }
        self.current.clear();
    }
}

impl<R: BufRead> Iterator for StoryReader<R> {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.next_story() {
            Ok(Some(s)) => Some(Ok(s)),
            Ok(None) => None,
            Err(e) => {
                self.done = true;
                self.ready.clear();
                Some(Err(e))
            }
        }
    }
}

/// End of the last occurrence of `needle` in `hay` as `str::split` finds them (left to right, not
/// overlapping), so that cutting there splits a long line exactly as splitting it whole would.
fn last_split_end(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    let (mut i, mut last) = (0, None);
    while i + needle.len() <= hay.len() {
        if &hay[i..i + needle.len()] == needle {
            i += needle.len();
            last = Some(i);
        } else {
            i += 1;
        }
    }
    last
}

/// Reads all stories of a small in-memory text (convenience for tests and tools).
pub fn stories_from_str(text: &str, separator: &str) -> Result<Vec<String>> {
    StoryReader::new(text.as_bytes(), "<memory>", separator).collect()
}

/// Reads all stories of a file into memory. Meant for small files (tests, tools); builds
/// stream with [`StoryReader`] instead.
pub fn read_stories(path: &Path, separator: &str) -> Result<Vec<String>> {
    StoryReader::open(path, separator)?.collect()
}

/// Wraps any reader in a `BufReader` of a size suited to multi-GB inputs.
pub fn buffered<R: Read>(reader: R) -> BufReader<R> {
    BufReader::with_capacity(1 << 20, reader)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEP: &str = "<|endoftext|>";

    #[test]
    fn splits_on_separator_lines_and_trims() {
        let text =
            "  Once upon a time.\nThe end.  \n<|endoftext|>\n\nSecond story.\n<|endoftext|>\n";
        let s = stories_from_str(text, SEP).unwrap();
        assert_eq!(s, vec!["Once upon a time.\nThe end.", "Second story."]);
    }

    #[test]
    fn handles_crlf() {
        let text = "A line.\r\nAnother.\r\n<|endoftext|>\r\nB.\r\n<|endoftext|>\r\n";
        let s = stories_from_str(text, SEP).unwrap();
        assert_eq!(s, vec!["A line.\nAnother.", "B."]);
    }

    #[test]
    fn trailing_text_without_final_separator_is_a_story() {
        let text = "First.\n<|endoftext|>\nLast one, no separator after it.";
        let s = stories_from_str(text, SEP).unwrap();
        assert_eq!(s, vec!["First.", "Last one, no separator after it."]);
    }

    #[test]
    fn skips_empty_stories_and_paragraph_breaks_survive() {
        let text = "<|endoftext|>\n\n  \n<|endoftext|>\nA.\n\nB.\n<|endoftext|>\n<|endoftext|>\n";
        let s = stories_from_str(text, SEP).unwrap();
        assert_eq!(s, vec!["A.\n\nB."]);
    }

    #[test]
    fn separator_inside_a_line_splits_too() {
        let text = "One.<|endoftext|>Two.\n<|endoftext|>  Three.  <|endoftext|>\n";
        let s = stories_from_str(text, SEP).unwrap();
        assert_eq!(s, vec!["One.", "Two.", "Three."]);
    }

    #[test]
    fn bom_is_dropped() {
        let text = "\u{feff}Hi.\n<|endoftext|>\n";
        assert_eq!(stories_from_str(text, SEP).unwrap(), vec!["Hi."]);
    }

    #[test]
    fn custom_separator() {
        let text = "a\n---\nb\n---\n";
        assert_eq!(stories_from_str(text, "---").unwrap(), vec!["a", "b"]);
    }

    #[test]
    fn errors_name_the_problem() {
        let e = stories_from_str("", SEP).unwrap_err();
        assert!(matches!(e, Error::EmptyInput { .. }), "{e}");
        let e = stories_from_str("no separators here\nat all\n", SEP).unwrap_err();
        assert!(matches!(e, Error::NoSeparator { .. }), "{e}");
        let bad: &[u8] = b"ok\n<|endoftext|>\n\xff\xfe\n";
        let e = StoryReader::new(bad, "f", SEP)
            .collect::<Result<Vec<_>>>()
            .unwrap_err();
        assert!(matches!(e, Error::InvalidUtf8 { line: 3, .. }), "{e}");
    }

    #[test]
    fn a_file_without_line_breaks_streams_in_pieces() {
        // 3 MB on one line: read READ_CHUNK at a time, stories never cut, and a separator that
        // straddles a piece boundary still found.
        let stories: Vec<String> = (0..100_000)
            .map(|i| format!("Story {i} is here."))
            .collect();
        let text = stories.join(SEP);
        assert!(text.len() > 2 * READ_CHUNK);
        let mut r = StoryReader::new(text.as_bytes(), "m", SEP);
        let mut got = Vec::new();
        while let Some(story) = r.next_story().unwrap() {
            got.push(story);
            // Nothing close to the whole file is ever held.
            assert!(r.line.capacity() <= 2 * READ_CHUNK + SEP.len());
        }
        assert_eq!(got, stories);
        assert_eq!(r.bytes_read(), text.len() as u64);
    }

    #[test]
    fn a_long_line_splits_like_a_short_one_with_overlapping_separators() {
        // "---" inside "----": str::split takes the leftmost match; so must the cut of a long line.
        let text: String = (0..300_000)
            .map(|i| format!("s{i}-"))
            .collect::<Vec<_>>()
            .join("---");
        assert!(text.len() > 2 * READ_CHUNK);
        let want: Vec<String> = text
            .split("---")
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        assert_eq!(stories_from_str(&text, "---").unwrap(), want);
    }

    #[test]
    fn lone_carriage_returns_break_lines() {
        let text = "A line.\rAnother.\r<|endoftext|>\rB.\r<|endoftext|>\r";
        let s = stories_from_str(text, SEP).unwrap();
        assert_eq!(s, vec!["A line.\nAnother.", "B."]);
    }

    #[test]
    fn a_long_line_without_separator_is_refused_early() {
        let text = "x".repeat(MAX_STORY_BYTES + 2 * READ_CHUNK);
        let mut r = StoryReader::new(text.as_bytes(), "m", SEP);
        let e = r.next_story().unwrap_err();
        assert!(matches!(e, Error::StoryTooLong { line: 1, .. }), "{e}");
        assert!(r.bytes_read() <= (MAX_STORY_BYTES + READ_CHUNK) as u64);
    }

    #[test]
    fn counts_bytes_and_separators() {
        let text = "a\n<|endoftext|>\nb\n<|endoftext|>\n";
        let mut r = StoryReader::new(text.as_bytes(), "m", SEP);
        while r.next_story().unwrap().is_some() {}
        assert_eq!(r.bytes_read(), text.len() as u64);
        assert_eq!(r.separators_seen(), 2);
    }
}
