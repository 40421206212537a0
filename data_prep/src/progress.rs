//! Byte progress with ETA: an indicatif bar on a terminal, plain occasional lines otherwise.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, HumanDuration, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often plain (non-terminal) progress lines are printed.
const PLAIN_INTERVAL: Duration = Duration::from_secs(10);

/// Progress of one pass over `total` bytes. Cheap to update from any thread.
pub struct Progress {
    label: String,
    total: u64,
    start: Instant,
    mode: Mode,
}

enum Mode {
    Off,
    Bar(ProgressBar),
    Plain(Mutex<Instant>),
}

impl Progress {
    /// Starts a pass; `enabled = false` makes every call a no-op.
    pub fn new(enabled: bool, label: &str, total: u64) -> Self {
        let mode = if !enabled {
            Mode::Off
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{msg:>10} [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} \
                 {binary_bytes_per_sec} ETA {eta}",
            )
            .expect("valid template");
            bar.set_style(style);
            bar.set_message(label.to_owned());
            Mode::Bar(bar)
        } else {
            Mode::Plain(Mutex::new(Instant::now()))
        };
        Progress {
            label: label.to_owned(),
            total,
            start: Instant::now(),
            mode,
        }
    }

    /// Sets the number of bytes done.
    pub fn set(&self, done: u64) {
        match &self.mode {
            Mode::Off => {}
            Mode::Bar(bar) => bar.set_position(done),
            Mode::Plain(last) => {
                let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
                if last.elapsed() >= PLAIN_INTERVAL {
                    *last = Instant::now();
                    eprintln!("{}", self.line(done));
                }
            }
        }
    }

    fn line(&self, done: u64) -> String {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let rate = done as f64 / secs;
        let pct = if self.total == 0 {
            100.0
        } else {
            100.0 * done as f64 / self.total as f64
        };
        let eta = if rate > 0.0 && self.total > done {
            HumanDuration(Duration::from_secs_f64((self.total - done) as f64 / rate)).to_string()
        } else {
            "-".into()
        };
        format!(
            "{}: {} / {} ({pct:.0}%), {}/s, ETA {eta}",
            self.label,
            HumanBytes(done),
            HumanBytes(self.total),
            HumanBytes(rate as u64)
        )
    }

    /// Ends the pass (clears the bar; prints a final line in plain mode).
    pub fn finish(&self) {
        match &self.mode {
            Mode::Off => {}
            Mode::Bar(bar) => bar.finish_and_clear(),
            Mode::Plain(_) => eprintln!(
                "{}: done, {} in {:.1}s",
                self.label,
                HumanBytes(self.total),
                self.start.elapsed().as_secs_f64()
            ),
        }
    }
}
