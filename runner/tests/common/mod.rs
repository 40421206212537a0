//! Helpers the end-to-end tests share (each test file uses a part of them).
#![allow(dead_code)]

use std::path::Path;
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
