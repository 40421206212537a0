//! The JSON-lines protocol on the engine's stdout (and in `RUN_DIR/metrics.jsonl`), read by the runner.
//! Documented in `engine/PROTOCOL.md`; bump [`PROTOCOL_VERSION`] on incompatible changes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of the event protocol, sent in the `start` event.
pub const PROTOCOL_VERSION: u32 = 2;

/// Exit code of an engine that stopped on SIGINT/SIGTERM after writing a checkpoint.
pub const EXIT_INTERRUPTED: i32 = 130;
/// Exit code of an engine that stopped on an error (the `error` event says which).
pub const EXIT_ERROR: i32 = 1;

/// One line of the protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    /// The run started (or resumed at `step`).
    Start {
        protocol: u32,
        run_dir: String,
        step: u64,
        total_steps: Option<u64>,
        params: u64,
        resumed: bool,
        device: String,
        /// Ranks of a data-parallel run (1 for a single process).
        world_size: usize,
    },
    /// Training progress, every `log_every` steps.
    Step {
        step: u64,
        loss: f64,
        lr: f64,
        tokens: u64,
        tokens_per_s: f64,
        elapsed_s: f64,
        grad_norm: f64,
        /// Further scalar metrics by name (optional; absent when empty).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        extra: BTreeMap<String, f64>,
    },
    /// Validation on the fixed val batches.
    Eval {
        step: u64,
        val_loss: f64,
        val_bpb: f64,
    },
    /// A checkpoint was written (atomically) at `path`.
    Checkpoint { step: u64, path: String, bytes: u64 },
    /// The run reached its length.
    Done {
        step: u64,
        tokens: u64,
        elapsed_s: f64,
        val_loss: Option<f64>,
        val_bpb: Option<f64>,
        /// sha256 of all parameters (identical on every rank of a data-parallel run).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        params_sha256: Option<String>,
    },
    /// Stopped at the budget `--pause-at` named (an early-stopping rung) after an eval and a checkpoint;
    /// exit code 0. A resume continues it exactly as if it had not stopped (the learning-rate schedule is
    /// the full run's).
    Paused {
        step: u64,
        tokens: u64,
        elapsed_s: f64,
        val_loss: f64,
        val_bpb: f64,
    },
    /// Stopped by a signal after checkpointing; resume continues from `step`.
    Interrupted { step: u64, signal: String },
    /// Stopped on an error.
    Error { message: String },
}

impl Event {
    /// The single JSON line (no newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("events serialise")
    }

    /// Parse one line; `None` for lines that are not protocol events.
    pub fn parse(line: &str) -> Option<Event> {
        let line = line.trim();
        // Step lines are nearly all of a stream: read them as a plain struct, without the buffering serde
        // needs for internally tagged enums (about twice as fast).
        if line.starts_with(r#"{"event":"step","#) {
            if let Ok(s) = serde_json::from_str::<StepLine>(line) {
                return Some(Event::Step {
                    step: s.step,
                    loss: s.loss,
                    lr: s.lr,
                    tokens: s.tokens,
                    tokens_per_s: s.tokens_per_s,
                    elapsed_s: s.elapsed_s,
                    grad_norm: s.grad_norm,
                    extra: s.extra,
                });
            }
        }
        serde_json::from_str(line).ok()
    }
}

/// The fields of a `step` line (the `event` tag is checked by the caller and ignored here).
#[derive(Deserialize)]
struct StepLine {
    step: u64,
    loss: f64,
    lr: f64,
    tokens: u64,
    tokens_per_s: f64,
    elapsed_s: f64,
    grad_norm: f64,
    #[serde(default)]
    extra: BTreeMap<String, f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_carry_the_event_tag() {
        let e = Event::Eval {
            step: 3,
            val_loss: 2.5,
            val_bpb: 1.25,
        };
        let line = e.to_line();
        assert!(line.starts_with("{\"event\":\"eval\""), "{line}");
        assert_eq!(Event::parse(&line), Some(e));
        assert_eq!(Event::parse("not json"), None);
        let step = Event::Step {
            step: 7,
            loss: 2.0,
            lr: 1e-3,
            tokens: 512,
            tokens_per_s: 100.0,
            elapsed_s: 1.5,
            grad_norm: 0.5,
            extra: [("mfu".to_string(), 0.25)].into(),
        };
        assert_eq!(Event::parse(&step.to_line()), Some(step));
        // A step line missing a field is not an event.
        assert_eq!(Event::parse(r#"{"event":"step","step":1}"#), None);
    }
}
