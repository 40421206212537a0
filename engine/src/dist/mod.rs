//! Data-parallel training: one process per rank, gradients averaged by an all-reduce.
//!
//! [`DistEnv`] reads rank and world size the way torchrun and Slurm hand them out; [`Communicator`] is the
//! one interface the training loop uses; [`tcp::TcpRing`] is the CPU backend (a ring all-reduce over TCP from
//! the `MASTER_ADDR:MASTER_PORT` rendezvous). A rank that dies closes its sockets and the others fail at once;
//! a rank that hangs makes the others fail after `ENGINE_DIST_TIMEOUT` seconds (default 120).

pub mod bench;
pub mod env;
pub mod tcp;

use anyhow::Result;
use std::time::Duration;

pub use env::DistEnv;

/// Collective operations over the ranks of one run.
pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum of `buf` over all ranks, in place on every rank.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()>;
}

/// The communicator of a single-process run: every collective is the identity.
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
}

/// How long a collective may wait for a peer before the run fails.
pub fn timeout() -> Duration {
    let secs = std::env::var("ENGINE_DIST_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(120.0);
    Duration::from_secs_f64(secs)
}

/// The communicator for this process: TCP ring for several CPU ranks, none for one.
pub fn connect(env: &DistEnv) -> Result<Box<dyn Communicator>> {
    if env.world_size == 1 {
        return Ok(Box::new(SingleProcess));
    }
    Ok(Box::new(tcp::TcpRing::connect(env, timeout())?))
}

/// Flat buckets: at most this many floats per all-reduce call.
pub const BUCKET_FLOATS: usize = 1 << 22;
