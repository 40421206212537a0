//! NCCL backend (`--features cuda`): one GPU per rank, gradients all-reduced on the device.
//!
//! The communicator is made from a unique id that rank 0 creates and hands to the other ranks over the
//! same rendezvous the CPU backend uses (`MASTER_ADDR:MASTER_PORT`, a TCP ring, so it works across
//! machines without a shared filesystem): the id's 128 bytes go round as an all-reduce that only rank 0
//! contributes to. With `NCCL_COMM_ID=host:port` set, NCCL derives the id itself and no exchange is needed.
//!
//! A rank that dies or hangs must not leave the others waiting forever (NCCL itself would: a collective
//! whose peer is gone spins on the GPU). So every NCCL call here has a deadline of `ENGINE_DIST_TIMEOUT`
//! seconds: the communicator is created (with peer connections made at init: `NCCL_RUNTIME_CONNECT=0`) on a
//! helper thread that is waited for with a timeout, and after
//! each all-reduce this thread polls a CUDA event recorded behind it together with
//! `ncclCommGetAsyncError`; on an error or a passed deadline the communicator is aborted
//! (`ncclCommAbort`, which makes the stuck kernels return) and the step fails with an error naming why.
//! cudarc's safe `Comm` hides the raw handle these calls need, so this file drives NCCL through cudarc's
//! thin `result`/`sys` layer.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    sys::CUdeviceptr, CudaStream, DevicePtr, DevicePtrMut,
};
use candle_core::cuda_backend::cudarc::nccl::{result, sys};
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
    comm: Arc<Watched>,
    /// The deadline of the next collectives (see `Communicator::set_timeout`).
    timeout: Duration,
}

/// A raw NCCL communicator, taken (and so aborted, once) when a collective on it fails or times out.
struct Watched {
    comm: Mutex<Option<RawComm>>,
}

/// The raw handle. This process drives it from the training thread only, one collective at a time, as
/// NCCL requires of a communicator.
struct RawComm(sys::ncclComm_t);
// SAFETY: see above: never used from two threads at once (the `Mutex` in `Watched` guarantees it).
unsafe impl Send for RawComm {}

impl Drop for RawComm {
    fn drop(&mut self) {
        // SAFETY: the handle came from ncclCommInitRank and is dropped exactly once.
        let _ = unsafe { result::comm_abort(self.0) };
    }
}

impl Nccl {
    pub fn connect(env: &DistEnv, device: &Device) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            bail!("the NCCL backend needs a CUDA device: set device = \"cuda\" (GPU LOCAL_RANK) or \"cuda:N\"");
        };
        let timeout = super::timeout();
        // NCCL ≥ 2.22 connects peers lazily, inside the first collective, where a hung peer would block
        // this thread in ncclAllReduce itself (before any completion event exists to poll). Connecting
        // during init keeps that wait under the init deadline below. A user's own setting is kept.
        if std::env::var_os("NCCL_RUNTIME_CONNECT").is_none() {
            std::env::set_var("NCCL_RUNTIME_CONNECT", "0");
        }
        let id = if env.world_size == 1 || std::env::var_os("NCCL_COMM_ID").is_some() {
            result::get_uniqueid().map_err(|e| anyhow!("ncclGetUniqueId (NCCL_COMM_ID): {e:?}"))?
        } else {
            let mut ring = super::tcp::TcpRing::connect(env, timeout)
                .context("the rendezvous that shares the NCCL id")?;
            let mine = if env.rank == 0 {
                let id = result::get_uniqueid().map_err(|e| anyhow!("ncclGetUniqueId: {e:?}"))?;
                Some(id.internal.map(|c| c as u8))
            } else {
                None
            };
            let bytes = super::broadcast_bytes::<ID_BYTES>(&mut ring, mine)?;
            sys::ncclUniqueId {
                internal: bytes.map(|b| b as std::ffi::c_char),
            }
        };
        let comm = init_rank(dev.cuda_stream(), env.rank, env.world_size, id, timeout)?;
        Ok(Self {
            rank: env.rank,
            world: env.world_size,
            device: device.clone(),
            comm: Arc::new(Watched {
                comm: Mutex::new(Some(comm)),
            }),
            timeout,
        })
    }
}

/// `ncclCommInitRank` on a helper thread, waited for at most `timeout`: it blocks until every rank has
/// joined, so a rank that died after the id exchange would otherwise hang this one.
fn init_rank(
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    id: sys::ncclUniqueId,
    timeout: Duration,
) -> Result<RawComm> {
    let (tx, rx) = mpsc::channel();
    let ctx = stream.context().clone();
    std::thread::Builder::new()
        .name("nccl-init".into())
        .spawn(move || {
            let made = ctx
                .bind_to_thread()
                .map_err(|e| anyhow!("binding the CUDA context: {e:?}"))
                .and_then(|()| {
                    let mut comm = std::mem::MaybeUninit::uninit();
                    // SAFETY: `comm` is written by a successful ncclCommInitRank before it is read.
                    unsafe {
                        result::comm_init_rank(comm.as_mut_ptr(), world as i32, id, rank as i32)
                            .map_err(|e| {
                                anyhow!("ncclCommInitRank (rank {rank} of {world}): {e:?}")
                            })?;
                        Ok(RawComm(comm.assume_init()))
                    }
                });
            let _ = tx.send(made);
        })
        .context("starting the NCCL init thread")?;
    match rx.recv_timeout(timeout) {
        Ok(made) => made,
        Err(_) => bail!(
            "ncclCommInitRank (rank {rank} of {world}) did not finish within {:.0} s: a rank died or cannot reach the others; check MASTER_ADDR and the network (ENGINE_DIST_TIMEOUT sets the limit)",
            timeout.as_secs_f64()
        ),
    }
}

impl Watched {
    /// Sum of `n` f32 from `src` into `dst` over all ranks, on `stream`, waited for at most `timeout`.
    fn all_reduce_sum(
        &self,
        stream: &Arc<CudaStream>,
        src: CUdeviceptr,
        dst: CUdeviceptr,
        n: usize,
        timeout: Duration,
    ) -> Result<()> {
        let mut guard = self
            .comm
            .lock()
            .map_err(|_| anyhow!("NCCL lock poisoned"))?;
        let Some(comm) = guard.as_ref() else {
            bail!("the NCCL communicator was aborted by an earlier failure");
        };
        // SAFETY: `src` and `dst` are live device buffers of `n` f32 on `stream`'s device.
        unsafe {
            result::all_reduce(
                src as _,
                dst as _,
                n,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                comm.0,
                stream.cu_stream() as _,
            )
        }
        .map_err(|e| anyhow!("ncclAllReduce: {e:?}"))?;
        let done = stream
            .record_event(None)
            .map_err(|e| anyhow!("recording a CUDA event: {e:?}"))?;
        let deadline = Instant::now() + timeout;
        let mut nap = Duration::from_micros(20);
        loop {
            match done.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    guard.take();
                    bail!("the all-reduce failed on the GPU: {e:?}");
                }
            }
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator and a valid out-pointer.
            unsafe { sys::ncclCommGetAsyncError(comm.0, &mut state) };
            if !matches!(
                state,
                sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
            ) {
                guard.take();
                bail!("NCCL reported {state:?} during the gradient all-reduce: a rank died or the network failed");
            }
            if Instant::now() > deadline {
                guard.take();
                bail!(
                    "the gradient all-reduce did not complete within {:.0} s: a rank died or hangs (ENGINE_DIST_TIMEOUT sets the limit)",
                    timeout.as_secs_f64()
                );
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(1));
        }
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

    fn set_timeout(&mut self, timeout: Duration) -> Result<()> {
        self.timeout = timeout;
        Ok(())
    }

    fn all_reduce_tensor_sum(&mut self, t: &Tensor) -> Result<Tensor> {
        let t = t.contiguous()?;
        Ok(t.apply_op1_no_bwd(&AllReduce {
            comm: self.comm.clone(),
            timeout: self.timeout,
        })?)
    }
}

/// Sum over ranks of an f32 CUDA tensor, as a candle op.
struct AllReduce {
    comm: Arc<Watched>,
    timeout: Duration,
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
            Some((a, b)) => src.slice(a..b),
            None => candle_core::bail!("the NCCL all-reduce needs a contiguous tensor"),
        };
        let dev = s.device().clone();
        let stream = dev.cuda_stream();
        let mut dst = dev.alloc_zeros::<f32>(n)?;
        {
            let (src_ptr, _src_read) = src.device_ptr(&stream);
            let (dst_ptr, _dst_write) = dst.device_ptr_mut(&stream);
            self.comm
                .all_reduce_sum(&stream, src_ptr, dst_ptr, n, self.timeout)
                .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        }
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
    }
}
