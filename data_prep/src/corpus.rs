//! Streaming story reader for the TinyStories `.txt` format.
//!
//! Stories are separated by the separator (default `<|endoftext|>`), normally on a line of its
//! own. Rules, applied line by line so memory stays bounded by the longest story:
//!
//! * line endings `\n` and `\r\n` are both accepted; a story's lines are joined with `\n`;
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

/// Reads stories one at a time from a [`BufRead`].
pub struct StoryReader<R> {
    reader: R,
    path: PathBuf,
    separator: String,
    line: Vec<u8>,
    line_no: u64,
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
            self.line.clear();
            let n = self
                .reader
                .read_until(b'\n', &mut self.line)
                .map_err(|err| Error::InputUnreadable {
                    path: self.path.clone(),
                    err,
                })?;
            if n == 0 {
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
            self.bytes_read += n as u64;
            self.line_no += 1;
            let line = std::mem::take(&mut self.line);
            let result = self.take_line(&line);
            self.line = line;
            result?;
        }
    }

    fn take_line(&mut self, raw: &[u8]) -> Result<()> {
        let mut bytes = raw;
        if let Some(b) = bytes.strip_suffix(b"\n") {
            bytes = b;
        }
        if let Some(b) = bytes.strip_suffix(b"\r") {
            bytes = b;
        }
        if self.line_no == 1 {
            if let Some(b) = bytes.strip_prefix("\u{feff}".as_bytes()) {
                bytes = b;
            }
        }
        let text = std::str::from_utf8(bytes).map_err(|_| Error::InvalidUtf8 {
            path: self.path.clone(),
            line: self.line_no,
        })?;
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
                line: self.line_no,
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
    fn counts_bytes_and_separators() {
        let text = "a\n<|endoftext|>\nb\n<|endoftext|>\n";
        let mut r = StoryReader::new(text.as_bytes(), "m", SEP);
        while r.next_story().unwrap().is_some() {}
        assert_eq!(r.bytes_read(), text.len() as u64);
        assert_eq!(r.separators_seen(), 2);
    }
}
