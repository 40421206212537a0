//! Shared fixtures for the engine's end-to-end tests: a small synthetic data build and tiny run configs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A synthetic corpus built with data_prep into `dir/data` (vocab ~400).
pub fn data_dir(dir: &Path) -> PathBuf {
    let corpus = dir.join("corpus.txt");
    data_prep::synth(&corpus, 300, 1).expect("synth corpus");
    let out = dir.join("data");
    let mut opts = data_prep::BuildOptions::new(vec![corpus], &out);
    opts.vocab_size = 400;
    opts.val_fraction = 0.1;
    data_prep::build(&opts).expect("data_prep build");
    out
}

/// A tiny run config (TOML text) over `data`.
pub fn tiny_config(data: &Path, extra: &str) -> String {
    format!(
        "data_dir = {:?}\ndim = 32\nn_layers = 2\nn_heads = 2\nttt_mini_batch = 8\nbatch_size = 4\ncontext_len = 32\n\
         lr = 0.003\nwarmup_steps = 5\nlog_every = 1\neval_every = 10\neval_batches = 2\ncheckpoint_every = 5\n\
         keep_checkpoints = 20\n{extra}",
        data.display().to_string()
    )
}

/// Build the synthetic data in `dir/data` and write `tiny_config(data, extra)` to `dir/run.toml`; its path.
pub fn write_run_config(dir: &Path, extra: &str) -> PathBuf {
    let data = data_dir(dir);
    let cfg = dir.join("run.toml");
    std::fs::write(&cfg, tiny_config(&data, extra)).unwrap();
    cfg
}

/// Write `tiny_config(data, config_extra)` to `dir/run.toml` and train it into `dir/run` (`args` appended):
/// the run dir and the engine's output.
pub fn first_run(dir: &Path, data: &Path, config_extra: &str, args: &[&str]) -> (PathBuf, Output) {
    let cfg = dir.join("run.toml");
    std::fs::write(&cfg, tiny_config(data, config_extra)).unwrap();
    let run_dir = dir.join("run");
    let mut all = vec![
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        run_dir.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    let out = run(&all);
    (run_dir, out)
}

pub fn engine() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_engine"));
    c.env("RUST_LOG", "warn");
    c
}

pub fn run(args: &[&str]) -> Output {
    engine().args(args).output().expect("engine runs")
}

/// (step, loss) of every step event in a metrics file or stdout text.
pub fn step_losses(text: &str) -> Vec<(u64, f64)> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "step")
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

pub fn events(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A child process killed when the test ends, even by a panic, so a failed test leaves no engine running.
pub struct Reaped(Option<std::process::Child>);

impl Reaped {
    pub fn new(child: std::process::Child) -> Self {
        Self(Some(child))
    }

    /// Take the child back (its owner now waits for it).
    pub fn into_inner(mut self) -> std::process::Child {
        self.0.take().expect("child present")
    }
}

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("child present")
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0.as_mut().expect("child present")
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
