//! The crate's single error type.
//!
//! Every message names the problem and, where the user can do something about it, what to do.
//! Messages are one line: causes (such as an [`std::io::Error`]) are part of the message rather
//! than a separate `source()`, so printing the error (or an `anyhow` chain with `{:#}`) never
//! repeats them.

use std::path::PathBuf;

/// Result alias used throughout `data_prep`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while preparing data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No `--input` file was given.
    #[error("no input files given; pass at least one --input FILE")]
    NoInputs,

    /// An input file could not be opened or read.
    #[error("cannot read input {}: {err} (check the path)", path.display())]
    InputUnreadable {
        /// The input file.
        path: PathBuf,
        /// What the OS said.
        err: std::io::Error,
    },

    /// An input file holds no bytes at all.
    #[error("input {} is empty; give a UTF-8 text file of stories separated by `{separator}` lines", path.display())]
    EmptyInput {
        /// The input file.
        path: PathBuf,
        /// The separator in use.
        separator: String,
    },

    /// An input file holds text but not a single separator.
    #[error(
        "no separator lines `{separator}` found in {}; stories must be separated by lines holding \
         the separator (pass --separator STRING if the file uses another one)",
        path.display()
    )]
    NoSeparator {
        /// The input file.
        path: PathBuf,
        /// The separator in use.
        separator: String,
    },

    /// An input line is not valid UTF-8.
    #[error(
        "{} line {line} is not valid UTF-8; convert the file to UTF-8 (for example with iconv) and rerun",
        path.display()
    )]
    InvalidUtf8 {
        /// The input file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
    },

    /// A single story grew past [`crate::corpus::MAX_STORY_BYTES`] without a separator.
    #[error(
        "a story in {} runs past {limit} bytes without a `{separator}` separator (at line {line}); \
         check that --separator matches the file",
        path.display()
    )]
    StoryTooLong {
        /// The input file.
        path: PathBuf,
        /// 1-based line number where the limit was crossed.
        line: u64,
        /// The limit in bytes.
        limit: usize,
        /// The separator in use.
        separator: String,
    },

    /// The separator is unusable.
    #[error("the separator {0:?} is unusable: it must be non-empty and hold no line break; pass --separator STRING")]
    BadSeparator(String),

    /// The requested vocabulary size does not fit the format.
    #[error(
        "vocab size {requested} is out of range: it must be at least {min} (256 byte tokens + 2 special \
         tokens) and at most {max} (token ids are stored as u16); pass --vocab-size N in that range"
    )]
    VocabSize {
        /// What was asked for.
        requested: usize,
        /// Smallest allowed size.
        min: usize,
        /// Largest allowed size.
        max: usize,
    },

    /// The validation fraction is not a probability.
    #[error("val fraction {0} is out of range: it must be between 0 and 1; pass --val-fraction F")]
    ValFraction(f64),

    /// No story ended up in the validation split.
    #[error(
        "the val split would be empty ({stories} stories at val fraction {val_fraction}); raise \
         --val-fraction or give the validation stories with --val-input FILE"
    )]
    EmptyValSplit {
        /// Number of stories in the inputs.
        stories: u64,
        /// The fraction in use.
        val_fraction: f64,
    },

    /// `--val-input` files were given but hold no story.
    #[error("the --val-input files hold no stories: check that they are story text with {separator:?} between stories")]
    EmptyValInputs {
        /// The story separator in use.
        separator: String,
    },

    /// No story ended up in the training split.
    #[error(
        "the train split would be empty ({reason}); lower --val-fraction or give more stories with --input FILE"
    )]
    EmptyTrainSplit {
        /// Why it is empty.
        reason: String,
    },

    /// The output folder already holds a build made from other inputs or settings.
    #[error(
        "{} already holds a different build ({reason}); pass --force to overwrite it, or choose another --out",
        dir.display()
    )]
    DifferentBuild {
        /// The output folder.
        dir: PathBuf,
        /// What differs.
        reason: String,
    },

    /// An input file changed while it was being read.
    #[error("input {} changed while the build was reading it ({reason}); rerun once the file is stable", path.display())]
    InputChanged {
        /// The input file.
        path: PathBuf,
        /// What was noticed.
        reason: String,
    },

    /// `meta.json` is missing, unreadable or from an incompatible version.
    #[error("cannot use build metadata {}: {reason}; run `data_prep build` (with --force) to recreate it", path.display())]
    Meta {
        /// The meta.json path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// The `tokenizers` crate reported an error.
    #[error("tokenizer error while {context}: {reason}")]
    Tokenizer {
        /// What was being done.
        context: String,
        /// The tokenizers crate's message.
        reason: String,
    },

    /// A file-system operation failed.
    #[error("{context}: {err}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// What the OS said.
        err: std::io::Error,
    },

    /// A download failed (offline, HTTP error, connection lost...).
    #[error(
        "could not download {url}: {reason}; if this machine cannot reach the Hugging Face hub, fetch the \
         .txt files another way and run `data_prep build --input FILE --val-input FILE --out DIR`"
    )]
    Download {
        /// The URL.
        url: String,
        /// What went wrong.
        reason: String,
    },

    /// `verify` found a mismatch between the outputs and the metadata or inputs.
    #[error("verification of {} failed: {reason}; rebuild with `data_prep build --force`", dir.display())]
    Verify {
        /// The build folder.
        dir: PathBuf,
        /// The first mismatch found.
        reason: String,
    },
}

impl Error {
    /// An [`Error::Io`] with a context that names the operation and path.
    pub fn io(context: impl Into<String>, err: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            err,
        }
    }

    /// An [`Error::Tokenizer`] from the `tokenizers` crate's boxed error.
    pub(crate) fn tokenizer(context: impl Into<String>, err: impl std::fmt::Display) -> Self {
        Error::Tokenizer {
            context: context.into(),
            reason: err.to_string(),
        }
    }
}

/// Adds a lazily built context to `std::io::Result`.
pub(crate) trait IoContext<T> {
    /// Maps the error to [`Error::Io`] with the given context.
    fn ctx<C: Into<String>>(self, context: impl FnOnce() -> C) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx<C: Into<String>>(self, context: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|err| Error::io(context(), err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_line_and_actionable() {
        let e = Error::NoSeparator {
            path: "x.txt".into(),
            separator: "<|endoftext|>".into(),
        };
        let s = e.to_string();
        assert!(!s.contains('\n'));
        assert!(s.contains("--separator"));
        let e = Error::Download {
            url: "http://h/x".into(),
            reason: "refused".into(),
        };
        assert!(e.to_string().contains("data_prep build --input"));
    }
}
