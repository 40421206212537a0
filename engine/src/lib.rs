//! Bit-Llama engine: the model, its training loop, checkpoints and generation.
//!
//! The library is what the runner depends on: the config schema (so sweep keys are validated by the same
//! code), the memory estimate and the event types of the JSON-lines protocol.

/// `eprintln!` that never panics: when the process reading our stderr is gone (a killed runner held the
/// pipe), a progress line must not abort training before its checkpoint.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// An error and its causes on one line (as `{e:#}`), a cause that only repeats the text before it left
/// out: candle's I/O errors and sqlx's SQLite errors carry their own message again as their source.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

pub mod bench;
pub mod cli;
pub mod cpu_f32;
pub mod device;
pub mod dist;
pub mod events;
pub mod infer;
pub mod model;
pub mod train;

#[cfg(test)]
mod tests {
    #[derive(Debug)]
    struct Repeats(&'static str);
    impl std::fmt::Display for Repeats {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for Repeats {}

    #[test]
    fn an_error_line_does_not_repeat_a_cause() {
        let e = anyhow::Error::new(Repeats("(code: 5) database is locked"))
            .context("(code: 5) database is locked")
            .context("writing to runs.db kept failing");
        assert_eq!(
            super::error_line(&e),
            "writing to runs.db kept failing: (code: 5) database is locked"
        );
    }
}
