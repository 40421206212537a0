//! Bit-Llama engine: the model, its training loop, checkpoints and generation.
//!
//! The library is what the runner depends on: the config schema (so sweep keys are validated by the same
//! code), the memory estimate and the event types of the JSON-lines protocol.

pub mod bench;
pub mod cli;
pub mod cpu_f32;
pub mod dist;
pub mod events;
pub mod infer;
pub mod model;
pub mod train;
