//! The live view of a sweep on the runner's stderr: indicatif bars on a terminal, plain lines otherwise.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use engine::events::Event;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::store::RunStatus;

/// Live view of the active runs: indicatif on a terminal, plain lines otherwise.
pub struct Display {
    multi: Option<MultiProgress>,
    pub overall: ProgressBar,
    bars: HashMap<i64, ProgressBar>,
    last_line: HashMap<i64, Instant>,
}

impl Display {
    pub fn new(total: usize) -> Self {
        let tty = std::io::stderr().is_terminal();
        let multi = tty.then(MultiProgress::new);
        let overall = match &multi {
            Some(m) => {
                let b = m.add(ProgressBar::new(total as u64));
                b.set_style(
                    ProgressStyle::with_template(
                        "runs {pos}/{len} [{elapsed_precise}] {bar:30} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                b
            }
            None => ProgressBar::hidden(),
        };
        Self {
            multi,
            overall,
            bars: HashMap::new(),
            last_line: HashMap::new(),
        }
    }

    pub fn line(&self, text: String) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(text);
            }
            None => eprintln!("{text}"),
        }
    }

    pub fn started(&mut self, run: i64, device: &str) {
        if let Some(m) = &self.multi {
            let b = m.add(ProgressBar::new(0));
            b.set_style(
                ProgressStyle::with_template(
                    "  run {prefix:>4} {pos:>6}/{len:6} {bar:20} {msg} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_prefix(run.to_string());
            self.bars.insert(run, b);
        }
        self.line(format!("run {run}: launched on {device}"));
    }

    pub fn event(&mut self, run: i64, ev: &Event) {
        let bar = self.bars.get(&run);
        match ev {
            Event::Start {
                step, total_steps, ..
            } => {
                if let Some(b) = bar {
                    b.set_length(total_steps.unwrap_or(0));
                    b.set_position(*step);
                    b.reset_eta();
                }
            }
            Event::Step {
                step,
                loss,
                tokens_per_s,
                ..
            } => {
                if let Some(b) = bar {
                    b.set_position(*step);
                    b.set_message(format!("loss {loss:.3} {tokens_per_s:.0} tok/s"));
                } else {
                    let due = self
                        .last_line
                        .get(&run)
                        .is_none_or(|t| t.elapsed() > Duration::from_secs(10));
                    if due {
                        self.last_line.insert(run, Instant::now());
                        self.line(format!(
                            "run {run}: step {step} loss {loss:.4} {tokens_per_s:.0} tok/s"
                        ));
                    }
                }
            }
            Event::Eval {
                step,
                val_loss,
                val_bpb,
            } => self.line(format!(
                "run {run}: step {step} val loss {val_loss:.4} ({val_bpb:.3} bpb)"
            )),
            _ => {}
        }
    }

    pub fn finished(&mut self, run: i64, status: RunStatus, reason: &str) {
        if let Some(b) = self.bars.remove(&run) {
            b.finish_and_clear();
            if let Some(m) = &self.multi {
                m.remove(&b);
            }
        }
        // A paused run comes back (promoted) or ends pruned: it is not done yet.
        if status != RunStatus::Paused {
            self.overall.inc(1);
        }
        self.line(format!("run {run}: {} {reason}", status.as_str()));
    }
}
