//! Data-parallel gradient averaging: every gradient of a step in one flat buffer, summed by the
//! [`Communicator`] and divided by the world size.

use std::time::Instant;

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::Communicator;

/// Average gradients across ranks with one flat all-reduce per bucket; the same buffer carries the
/// local loss sum and the stop, time-up and pause flags. Returns the global loss sum, whether any rank set a flag,
/// and the all-reduce's milliseconds (the device is synchronised first, so backward is not counted).
pub fn average_gradients(
    comm: &mut dyn Communicator,
    grads: &mut GradStore,
    vars: &[Var],
    loss_sum: f64,
    flags: [bool; 3],
) -> Result<(f64, [bool; 3], f64)> {
    let world = comm.world_size() as f64;
    // One flat f32 buffer on the training device: every gradient, then the loss and the three flags.
    let mut parts = Vec::with_capacity(vars.len() + 1);
    let mut shapes = Vec::with_capacity(vars.len());
    for v in vars {
        match grads.get(v.as_tensor()) {
            Some(g) => {
                shapes.push(Some((g.shape().clone(), g.dtype())));
                parts.push(g.to_dtype(DType::F32)?.flatten_all()?);
            }
            None => shapes.push(None),
        }
    }
    let device = vars
        .first()
        .map_or(candle_core::Device::Cpu, |v| v.device().clone());
    let tail = [
        loss_sum as f32,
        f32::from(u8::from(flags[0])),
        f32::from(u8::from(flags[1])),
        f32::from(u8::from(flags[2])),
    ];
    parts.push(Tensor::new(&tail, &device)?);
    let flat = Tensor::cat(&parts, 0)?;
    let n_grads = flat.elem_count() - tail.len();
    flat.device().synchronize()?;
    let started = Instant::now();
    let summed = comm.all_reduce_tensor_sum(&flat)?;
    // Both backends return once the sum is complete (NCCL: its completion event was waited for).
    let allreduce_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut offset = 0;
    for (v, shape) in vars.iter().zip(shapes) {
        let Some((shape, dtype)) = shape else {
            continue;
        };
        let len = shape.elem_count();
        let avg = (summed.narrow(0, offset, len)? / world)?;
        offset += len;
        grads.insert(v.as_tensor(), avg.reshape(shape)?.to_dtype(dtype)?);
    }
    let tail = summed.narrow(0, n_grads, 4)?.to_vec1::<f32>()?;
    Ok((
        tail[0] as f64,
        [tail[1] > 0.0, tail[2] > 0.0, tail[3] > 0.0],
        allreduce_ms,
    ))
}
