//! The engine process's plumbing around the training loop: the run dir's lock, stop signals (SIGINT,
//! SIGTERM, the parent-death signal), the SIGBUS message for a token file changed under the run.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

/// Take the run directory's lock so two engines never write the same run.
pub fn lock_run_dir(run_dir: &Path) -> Result<std::fs::File> {
    let path = run_dir.join(".lock");
    match data_prep::fsutil::try_lock_file(&path)
        .with_context(|| format!("locking {}", path.display()))?
    {
        Some(f) => Ok(f),
        None => bail!(
            "run dir {} is in use by another engine process",
            run_dir.display()
        ),
    }
}

/// Register SIGINT/SIGTERM: the first sets the returned flag (finish the step, checkpoint, exit); a second
/// one exits at once with the interrupted code.
pub fn install_signal_handlers() -> Result<Signals> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let signals = Signals {
        any: Arc::new(AtomicBool::new(false)),
        term: Arc::new(AtomicBool::new(false)),
        int: Arc::new(AtomicBool::new(false)),
        parent: Arc::new(AtomicBool::new(false)),
    };
    for (sig, which) in [(SIGINT, &signals.int), (SIGTERM, &signals.term)] {
        signal_hook::flag::register_conditional_shutdown(
            sig,
            crate::events::EXIT_INTERRUPTED,
            signals.any.clone(),
        )?;
        signal_hook::flag::register(sig, signals.any.clone())?;
        signal_hook::flag::register(sig, which.clone())?;
    }
    // The parent-death signal (see `die_with_parent`) only ever asks for a graceful stop: the kernel may
    // deliver it more than once (once per thread that inherited the setting), which as SIGTERM counted as
    // the "second signal" and exited without the checkpoint.
    signal_hook::flag::register(PARENT_DEATH_SIGNAL, signals.any.clone())?;
    signal_hook::flag::register(PARENT_DEATH_SIGNAL, signals.parent.clone())?;
    Ok(signals)
}

/// SIGBUS here means a memory-mapped token file shrank or was rewritten in place under the run (a `cp` over
/// train.bin; `data_prep build` replaces files atomically). Say so in one line instead of dying silently.
pub fn install_sigbus_message() {
    extern "C" fn on_sigbus(_: libc::c_int) {
        const MSG: &[u8] = b"error: a token file of data_dir changed or shrank under the running engine (SIGBUS): \
rebuild the data with `data_prep build --force` (it replaces files atomically) and resume from the last checkpoint\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe.
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            libc::_exit(1);
        }
    }
    // SAFETY: installing a handler that only calls async-signal-safe functions.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
}

/// Sent by the kernel when the launching process (the runner) dies.
const PARENT_DEATH_SIGNAL: i32 = signal_hook::consts::SIGUSR1;

/// Which stop signals this process received.
pub struct Signals {
    pub any: Arc<AtomicBool>,
    term: Arc<AtomicBool>,
    int: Arc<AtomicBool>,
    parent: Arc<AtomicBool>,
}

impl Signals {
    /// The name the `interrupted` event carries: the signal this process got, "parent" when the
    /// launching process died, or, in a data-parallel run stopped because another rank was signalled,
    /// "peer".
    pub fn name(&self) -> &'static str {
        if self.term.load(Ordering::SeqCst) {
            "SIGTERM"
        } else if self.int.load(Ordering::SeqCst) {
            "SIGINT"
        } else if self.parent.load(Ordering::SeqCst) {
            "parent"
        } else {
            "peer"
        }
    }
}

/// The variable a launcher sets to its own pid so that an engine can tell whether it is still its parent.
pub const PARENT_PID_VAR: &str = "BITLLAMA_PARENT_PID";

/// Ask the kernel to signal this process when the launching process (e.g. the runner) dies, so no engine
/// outlives its runner as an orphan: it checkpoints and stops as on SIGTERM (see `PARENT_DEATH_SIGNAL`).
/// A launcher that died before this call sends no signal: when it named itself in `BITLLAMA_PARENT_PID`
/// and this process has another parent by now (it was re-parented), the stop is asked for here.
pub fn die_with_parent(signals: &Signals) {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers and has no memory effects.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL);
    }
    if parent_gone(std::env::var(PARENT_PID_VAR).ok().as_deref()) {
        signals.parent.store(true, Ordering::SeqCst);
        signals.any.store(true, Ordering::SeqCst);
    }
}

/// Whether the launcher named by `expected` (a pid) is no longer this process's parent.
fn parent_gone(expected: Option<&str>) -> bool {
    let Some(pid) = expected.and_then(|p| p.trim().parse::<i32>().ok()) else {
        return false;
    };
    // SAFETY: getppid(2) has no arguments and cannot fail.
    unsafe { libc::getppid() != pid }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parent_that_is_not_ours_any_more_asks_for_a_stop() {
        // SAFETY: getppid(2) cannot fail.
        let ours = unsafe { libc::getppid() };
        assert!(!parent_gone(None), "no launcher named: nothing to check");
        assert!(!parent_gone(Some("not a pid")));
        assert!(!parent_gone(Some(&ours.to_string())));
        assert!(parent_gone(Some(&(ours + 1).to_string())));
    }
}
