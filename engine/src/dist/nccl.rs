//! NCCL backend (`--features cuda`): one GPU per rank, gradients all-reduced on the device.
//!
//! The communicator is made from a unique id that rank 0 creates and hands to the other ranks over the
//! same rendezvous the CPU backend uses (`MASTER_ADDR:MASTER_PORT`, a TCP ring, so it works across
//! machines without a shared filesystem): the id's 128 bytes go round as an all-reduce that only rank 0
//! contributes to. With `NCCL_COMM_ID=host:port` set, NCCL derives the id itself and no exchange is needed.
//! The TCP ring stays open for nothing else; a rank that dies or hangs during setup fails the others
//! after `ENGINE_DIST_TIMEOUT` (NCCL's own watchdog and `--kill-on-bad-exit` / the runner cover later).

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};

use super::{Communicator, DistEnv};

/// Bytes of an NCCL unique id.
const ID_BYTES: usize = 128;

/// An NCCL communicator over the ranks of a run.
pub struct Nccl {
    rank: usize,
    world: usize,
    device: Device,
    comm: Arc<SendComm>,
}

/// `Comm` holds raw NCCL and CUDA handles. This process uses it from the training thread only, one
/// collective at a time, which is what NCCL requires of a communicator.
struct SendComm(Comm);
// SAFETY: see above: never used from two threads at once.
unsafe impl Send for SendComm {}
// SAFETY: see above.
unsafe impl Sync for SendComm {}

impl Nccl {
    pub fn connect(env: &DistEnv, device: &Device) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            bail!("the NCCL backend needs a CUDA device: set device = \"cuda\" (GPU LOCAL_RANK) or \"cuda:N\"");
        };
        let id = if env.world_size == 1 || std::env::var_os("NCCL_COMM_ID").is_some() {
            Id::new().map_err(|e| anyhow!("ncclGetUniqueId (NCCL_COMM_ID): {e:?}"))?
        } else {
            let mut ring = super::tcp::TcpRing::connect(env, super::timeout())
                .context("the rendezvous that shares the NCCL id")?;
            let mut buf = [0f32; ID_BYTES];
            if env.rank == 0 {
                let id = Id::new().map_err(|e| anyhow!("ncclGetUniqueId: {e:?}"))?;
                for (b, c) in buf.iter_mut().zip(id.internal()) {
                    *b = *c as f32;
                }
            }
            ring.all_reduce_sum(&mut buf)?;
            let mut internal = [0 as std::ffi::c_char; ID_BYTES];
            for (c, b) in internal.iter_mut().zip(buf) {
                *c = b as std::ffi::c_char;
            }
            Id::uninit(internal)
        };
        let comm =
            Comm::from_rank(dev.cuda_stream(), env.rank, env.world_size, id).map_err(|e| {
                anyhow!(
                    "ncclCommInitRank (rank {} of {}): {e:?}",
                    env.rank,
                    env.world_size
                )
            })?;
        Ok(Self {
            rank: env.rank,
            world: env.world_size,
            device: device.clone(),
            comm: Arc::new(SendComm(comm)),
        })
    }
}

impl Communicator for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        // Host buffers go through the device (used for small control values only).
        let t = Tensor::from_slice(buf, buf.len(), &self.device)?;
        let out = self.all_reduce_tensor_sum(&t)?.to_vec1::<f32>()?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn all_reduce_tensor_sum(&mut self, t: &Tensor) -> Result<Tensor> {
        let t = t.contiguous()?;
        Ok(t.apply_op1_no_bwd(&AllReduce {
            comm: self.comm.clone(),
        })?)
    }
}

/// Sum over ranks of an f32 CUDA tensor, as a candle op.
struct AllReduce {
    comm: Arc<SendComm>,
}

impl CustomOp1 for AllReduce {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce runs on CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = l.shape().elem_count();
        let src = s.as_cuda_slice::<f32>()?;
        let src = match l.contiguous_offsets() {
            Some((0, end)) if end == src.len() => src.slice(..),
            Some((a, b)) => src.slice(a..b),
            None => candle_core::bail!("the NCCL all-reduce needs a contiguous tensor"),
        };
        let dev = s.device().clone();
        let mut dst = dev.alloc_zeros::<f32>(n)?;
        self.comm
            .0
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
    }
}
