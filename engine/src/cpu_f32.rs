//! Contiguous f32 views of CPU storages and tensors: how every fused CPU op of the model and the trainer
//! reads and writes its operands without copying them.

use candle_core::{CpuStorage, DType, Layout, Result, Storage, StorageRef, Tensor};

/// Whether `t` is an f32 tensor on the CPU: where the fused ops apply.
pub fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// Element-wise sum of per-task partial vectors of length `n`, added in task order (so the result does
/// not depend on how many threads ran the tasks).
pub fn sum_in_order<'a>(parts: impl IntoIterator<Item = &'a Vec<f32>>, n: usize) -> Vec<f32> {
    let mut total = vec![0f32; n];
    for p in parts {
        total.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    total
}

/// The elements of a contiguous f32 CPU storage; an error naming `op` otherwise.
pub fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: operands must be contiguous f32"),
    }
}

/// The elements of a contiguous f32 CPU storage, to update in place.
pub fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{op}: the updated tensor must be contiguous f32"),
    }
}

/// A tensor's storage held for reading (what a fused op's backward, which gets tensors, reads through).
pub struct View<'a> {
    storage: StorageRef<'a>,
    layout: &'a Layout,
}

pub fn view(t: &Tensor) -> View<'_> {
    let (storage, layout) = t.storage_and_layout();
    View { storage, layout }
}

impl View<'_> {
    /// The tensor's elements, when it is contiguous f32 on the CPU.
    pub fn slice(&self, op: &str) -> Result<&[f32]> {
        match &*self.storage {
            Storage::Cpu(s) => slice(s, self.layout, op),
            _ => candle_core::bail!("{op}: operands must be on the CPU"),
        }
    }
}
