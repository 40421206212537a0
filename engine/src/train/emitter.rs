//! `Emitter`: writes protocol events to stdout (one JSON object per line, flushed) and appends the same
//! lines to `RUN_DIR/metrics.jsonl`. Without a terminal it also logs a short human line to stderr.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::events::Event;

pub struct Emitter {
    file: Option<(File, PathBuf)>,
    human: bool,
}

impl Emitter {
    pub fn stdout_only() -> Self {
        Self {
            file: None,
            human: !std::io::stderr().is_terminal(),
        }
    }

    /// Also append events to `path` from now on.
    pub fn attach_file(&mut self, path: &Path) -> Result<()> {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        // A process killed mid-line left a fragment: end it, so the next event starts a line of its own
        // (readers skip the fragment instead of losing the event glued to it).
        if ends_mid_line(&mut f)? {
            writeln!(f).with_context(|| format!("writing {}", path.display()))?;
        }
        self.file = Some((f, path.to_path_buf()));
        Ok(())
    }

    /// Write one event. Stdout is best effort (its reader may be gone: a killed runner); a failed write to
    /// `metrics.jsonl` is an error, because the Slurm backend follows that file and would lose the run's
    /// progress and its end. The file is then detached, so the error event that follows goes to stdout only.
    pub fn emit(&mut self, event: &Event) -> Result<()> {
        let line = event.to_line();
        {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
        if let Some((f, path)) = &mut self.file {
            if let Err(e) = writeln!(f, "{line}").and_then(|()| f.flush()) {
                let path = path.clone();
                self.file = None;
                return Err(e).with_context(|| {
                    format!("writing {} failed (the last checkpoint is intact; free space there and resume)", path.display())
                });
            }
        }
        if self.human {
            match event {
                Event::Step {
                    step,
                    loss,
                    tokens_per_s,
                    ..
                } => {
                    crate::say!("step {step}: loss {loss:.4}, {tokens_per_s:.0} tok/s")
                }
                Event::Eval {
                    step,
                    val_loss,
                    val_bpb,
                } => {
                    crate::say!("step {step}: val loss {val_loss:.4}, {val_bpb:.4} bpb")
                }
                Event::Checkpoint { path, .. } => crate::say!("checkpoint {path}"),

                _ => {}
            }
        }
        // How the run ended, on a terminal too (after the progress bar).
        match event {
            Event::Interrupted { step, signal } => crate::say!(
                "interrupted ({signal}) at step {step}; its checkpoint is saved: `engine train --resume RUN_DIR` continues"
            ),
            Event::Paused { step, val_loss, .. } => crate::say!(
                "paused at step {step} (val loss {val_loss:.4}); `engine train --resume RUN_DIR` continues"
            ),
            Event::Done { step, val_loss, .. } => match val_loss {
                Some(v) => crate::say!("done at step {step}: val loss {v:.4}"),
                None => crate::say!("done at step {step}"),
            },
            _ => {}
        }
        Ok(())
    }
}

/// Whether a non-empty file's last byte is not a line break.
fn ends_mid_line(f: &mut File) -> Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    if f.metadata()?.len() == 0 {
        return Ok(false);
    }
    f.seek(SeekFrom::End(-1))?;
    let mut last = [0u8];
    f.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_ended_before_new_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, "{\"event\":\"step\",\"step\":1}\n{\"event\":\"st").unwrap();
        let mut e = Emitter::stdout_only();
        e.attach_file(&path).unwrap();
        e.emit(&Event::Error {
            message: "x".into(),
        })
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let last = text.lines().last().unwrap();
        assert!(last.starts_with("{\"event\":\"error\""), "{text}");
        // An intact file gets nothing extra.
        let before = std::fs::read(&path).unwrap();
        let mut e = Emitter::stdout_only();
        e.attach_file(&path).unwrap();
        drop(e);
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn a_failed_metrics_write_is_an_error() {
        // /dev/full takes the open and fails every write with ENOSPC, as a full disk does.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::os::unix::fs::symlink("/dev/full", &path).unwrap();
        let mut e = Emitter::stdout_only();
        e.attach_file(&path).unwrap();
        let err = e
            .emit(&Event::Error {
                message: "x".into(),
            })
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("metrics.jsonl") && text.contains("No space left"),
            "{text}"
        );
        // Detached: what follows (the run's error event) still reaches stdout without failing again.
        assert!(e
            .emit(&Event::Error {
                message: "y".into(),
            })
            .is_ok());
    }
}
