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

pub mod bench;
pub mod cli;
pub mod cpu_f32;
pub mod dist;
pub mod events;
pub mod infer;
pub mod model;
pub mod train;
