//! `Emitter`: writes protocol events to stdout (one JSON object per line, flushed) and appends the same
//! lines to `RUN_DIR/metrics.jsonl`. Without a terminal it also logs a short human line to stderr.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::Path;

use anyhow::{Context, Result};

use crate::events::Event;

pub struct Emitter {
    file: Option<File>,
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
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        self.file = Some(f);
        Ok(())
    }

    pub fn emit(&mut self, event: &Event) {
        let line = event.to_line();
        {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
        if let Some(f) = &mut self.file {
            let _ = writeln!(f, "{line}");
            let _ = f.flush();
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
            Event::Done { step, val_loss, .. } => match val_loss {
                Some(v) => crate::say!("done at step {step}: val loss {v:.4}"),
                None => crate::say!("done at step {step}"),
            },
            _ => {}
        }
    }
}
