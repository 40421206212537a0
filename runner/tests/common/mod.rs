//! Helpers the end-to-end tests share (each test file uses a part of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};

/// The runner binary on `home`, with the embedded engine (RUNNER_ENGINE cleared).
pub fn runner(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_runner"));
    c.arg("--home")
        .arg(home)
        .env("RUST_LOG", "warn")
        .env_remove("RUNNER_ENGINE");
    c
}

/// A child process killed when the test ends, even by a panic (no orphaned sweeps).
pub struct Reaped(pub Option<Child>);

impl Reaped {
    pub fn wait_with_output(mut self) -> std::io::Result<Output> {
        self.0.take().expect("child").wait_with_output()
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

/// Start `cmd` with its output discarded (a runner left to run while the test acts on it).
pub fn quiet(cmd: &mut Command) -> Child {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// A command's stdout, after asserting it succeeded (its output in the failure message).
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A sweep file over a synthetic data dir inside `dir`.
pub fn sweep_file(dir: &Path, name: &str, steps: u64, sweep: &str) -> PathBuf {
    let text = format!(
        "name = \"{name}\"\n[data]\ndir = \"{}\"\nsynth_stories = 200\nvocab_size = 300\n\
         [base]\ndim = 16\nn_heads = 2\nttt_mini_batch = 4\nsteps = {steps}\nlog_every = 1\neval_every = 5\neval_batches = 1\n\
         checkpoint_every = 5\nwarmup_steps = 2\n[sweep]\n{sweep}\n[resources]\ndevices = [\"cpu\"]\nmax_parallel = 2\n",
        dir.join("data").display()
    );
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

pub fn report_json(home: &Path, sweep: &str) -> Vec<serde_json::Value> {
    let out = runner(home)
        .args(["report", sweep, "--format", "json"])
        .output()
        .unwrap();
    serde_json::from_str(&ok(&out)).unwrap()
}

/// A sweep file of tiny runs (batch 4 × context 16, `steps`) over `sweep`, with `extra` appended (an
/// `[early_stop]` section) and `replace` pairs applied.
pub fn search_file(
    dir: &Path,
    name: &str,
    steps: u64,
    sweep: &str,
    replace: &[(&str, &str)],
    extra: &str,
) -> PathBuf {
    let file = sweep_file(dir, name, steps, sweep);
    let mut text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("[base]\n", "[base]\nbatch_size = 4\ncontext_len = 16\n");
    for (from, to) in replace {
        text = text.replace(from, to);
    }
    std::fs::write(&file, text + extra).unwrap();
    file
}

/// Training FLOPs per token of the tests' tiny model (dim `dim`, 2 heads, mini-batch 4, context 16, the
/// synthetic data's vocab of 300), as the engine counts them: budgets in steps of it make IsoFLOP tests.
pub fn tiny_flops_per_token(dim: usize) -> f64 {
    engine::train::TrainConfig {
        dim,
        n_heads: 2,
        ttt_mini_batch: 4,
        context_len: 16,
        ..Default::default()
    }
    .model_config(300)
    .flops_per_token(16)
}
