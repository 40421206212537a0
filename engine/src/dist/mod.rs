//! Data-parallel training: one process per rank, gradients averaged by an all-reduce.
//!
//! [`DistEnv`] reads rank and world size the way torchrun and Slurm hand them out; [`Communicator`] is the
//! one interface the training loop uses; `nccl::Nccl` (CUDA builds) all-reduces on the GPUs; [`tcp::TcpRing`] is
//! the CPU backend (a ring all-reduce over TCP from
//! the `MASTER_ADDR:MASTER_PORT` rendezvous). A rank that dies closes its sockets and the others fail at once;
//! a rank that hangs makes the others fail after `ENGINE_DIST_TIMEOUT` seconds (default 120).

pub mod bench;
pub mod env;
pub mod grads;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod tcp;

use anyhow::Result;
use candle_core::{Device, Tensor};
use std::time::Duration;

pub use env::DistEnv;
pub use grads::average_gradients;

/// Collective operations over the ranks of one run.
pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Whether collectives really run (any backend, even for one rank, as `ENGINE_DIST_BACKEND=nccl` asks),
    /// rather than being the identity of a plain single-process run.
    fn is_collective(&self) -> bool {
        true
    }
    /// Element-wise sum of `buf` over all ranks, in place on every rank.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()>;

    /// Element-wise sum of a flat f32 tensor over all ranks. By default through host memory in buckets of
    /// [`BUCKET_FLOATS`]; a GPU backend reduces on the device.
    fn all_reduce_tensor_sum(&mut self, t: &Tensor) -> Result<Tensor> {
        let mut flat = t.flatten_all()?.to_vec1::<f32>()?;
        for bucket in flat.chunks_mut(BUCKET_FLOATS) {
            self.all_reduce_sum(bucket)?;
        }
        Ok(Tensor::from_vec(flat, t.shape(), t.device())?)
    }

    /// How long the next collectives may wait for a peer. The training loop lengthens it (to
    /// [`leader_work_timeout`]) for the collective that follows a checkpoint, which only the leader
    /// writes while the other ranks wait, and shortens it again after.
    fn set_timeout(&mut self, _timeout: Duration) -> Result<()> {
        Ok(())
    }
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
    fn is_collective(&self) -> bool {
        false
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
}

/// How long a collective may wait for a peer before the run fails: `ENGINE_DIST_TIMEOUT` seconds (default
/// 120; at least 1 ms, at most a year, so `inf` means "practically never").
pub fn timeout() -> Duration {
    let secs = std::env::var("ENGINE_DIST_TIMEOUT")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(120.0)
        .clamp(1e-3, 365.0 * 86_400.0);
    Duration::from_secs_f64(secs)
}

/// The wait allowed for the collective after a checkpoint, which the leader writes alone (a large
/// model's checkpoint on a network filesystem can take minutes): ten times [`timeout`].
pub fn leader_work_timeout() -> Duration {
    timeout().saturating_mul(10)
}

/// The communicator for this process: none for one rank, NCCL for ranks on CUDA devices (CUDA builds),
/// the TCP ring for CPU ranks.
/// `ENGINE_DIST_BACKEND=nccl` makes even a single rank go through NCCL (a world-size-1 check of the GPU
/// path); `tcp` keeps GPU ranks on the TCP ring (host copies).
pub fn connect(env: &DistEnv, device: &Device) -> Result<Box<dyn Communicator>> {
    let forced = std::env::var("ENGINE_DIST_BACKEND").unwrap_or_default();
    if !matches!(forced.as_str(), "" | "auto" | "nccl" | "tcp") {
        anyhow::bail!("ENGINE_DIST_BACKEND={forced:?} is not auto, nccl or tcp");
    }
    if forced == "nccl" && !device.is_cuda() {
        anyhow::bail!(
            "ENGINE_DIST_BACKEND=nccl needs device = \"cuda\" or \"cuda:N\" (and a CUDA build)"
        );
    }
    if env.world_size == 1 && forced != "nccl" {
        return Ok(Box::new(SingleProcess));
    }
    if device.is_cuda() && forced != "tcp" {
        #[cfg(feature = "cuda")]
        return Ok(Box::new(nccl::Nccl::connect(env, device)?));
    }
    Ok(Box::new(tcp::TcpRing::connect(env, timeout())?))
}

/// Hands `N` bytes that rank 0 makes (the NCCL id) to every rank: a sum to which only rank 0 contributes,
/// each byte carried exactly as an f32. Every rank gets rank 0's bytes, rank 0 included.
pub fn broadcast_bytes<const N: usize>(
    comm: &mut dyn Communicator,
    from_rank0: Option<[u8; N]>,
) -> Result<[u8; N]> {
    let mut buf = [0f32; N];
    if comm.rank() == 0 {
        let bytes = from_rank0.ok_or_else(|| anyhow::anyhow!("rank 0 has no bytes to hand out"))?;
        for (b, c) in buf.iter_mut().zip(bytes) {
            *b = f32::from(c);
        }
    }
    comm.all_reduce_sum(&mut buf)?;
    let mut out = [0u8; N];
    for (o, b) in out.iter_mut().zip(buf) {
        if !(0.0..=255.0).contains(&b) || b.fract() != 0.0 {
            anyhow::bail!("the bytes from rank 0 arrived damaged ({b}): do all ranks share MASTER_ADDR:MASTER_PORT with this run alone?");
        }
        *o = b as u8;
    }
    Ok(out)
}

/// A TCP port on this machine that is free now, for a rendezvous (`MASTER_PORT`). Picked below the
/// kernel's ephemeral range: a port the kernel handed out (`bind(0)`) and released may be given again as
/// the local end of some outgoing connection — another run's ranks connecting — before rank 0 listens on it.
pub fn pick_free_port() -> std::io::Result<u16> {
    use rand::Rng;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if ephemeral_low > 12_000 {
        let mut rng = rand::thread_rng();
        for _ in 0..200 {
            let port = rng.gen_range(10_000..ephemeral_low);
            // One at a time (each listener closes before the next bind).
            let free = |addr: &str| std::net::TcpListener::bind((addr, port)).is_ok();
            if free("127.0.0.1") && free("0.0.0.0") {
                return Ok(port);
            }
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Flat buckets: at most this many floats per all-reduce call.
pub const BUCKET_FLOATS: usize = 1 << 22;
