//! Next-token cross entropy, fused on CPU. Over a 16k vocabulary the logits are the largest tensor of a step
//! (64 MiB at 1,024 tokens), and the composed `matmul` + `log_softmax` + `nll` makes several full-size
//! temporaries and passes, forward and backward. [`linear_cross_entropy`] takes the hidden states and the
//! head instead: one GEMM makes the logits, one pass per row turns them into the loss and, in place, into
//! their gradient (softmax − one-hot) / N, and the backward is two GEMMs from that buffer. The logits never
//! enter the autograd graph.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu_f32;
use crate::model::precision;

/// `dst (m×n) = beta · lhs (m×k) · rhs (k×n)`, each operand given by its pointer and (row, column) strides.
///
/// # Safety
/// Every index the shapes and strides reach must lie inside the operand's allocation, and `dst` must not
/// overlap the inputs.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_strides: (isize, isize),
    lhs: *const f32,
    lhs_strides: (isize, isize),
    rhs: *const f32,
    rhs_strides: (isize, isize),
    beta: f32,
) {
    let threads = candle_core::utils::get_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_strides.1,
        dst_strides.0,
        false,
        lhs,
        lhs_strides.1,
        lhs_strides.0,
        rhs,
        rhs_strides.1,
        rhs_strides.0,
        0.0,
        beta,
        false,
        false,
        false,
        par,
    )
}

const OP: &str = "linear cross entropy";

/// eˣ for x ≤ 0 (Cephes' expf: 2ⁿ · a degree-6 polynomial in the remainder, within 2 ulp; 0 below −87),
/// branch-free so the row loop vectorises, unlike a call to libm's `expf` per element.
#[inline(always)]
#[allow(clippy::excessive_precision)] // Cephes' coefficients as published
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 · 2²³: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let er = p * r * r + r + 1.0;
    er * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// Mean over rows i of CE(h_i · Wᵀ, t_i) for hidden states h (N, D), head W (V, D) and targets t.
struct LinearCrossEntropy {
    targets: Vec<u32>,
    /// ∂loss/∂logits (N×V), made in the forward for the backward.
    dlogits: Mutex<Option<Vec<f32>>>,
}

impl CustomOp2 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (h, w) = (cpu_f32::slice(s1, l1, OP)?, cpu_f32::slice(s2, l2, OP)?);
        let ((n, d), (v, d2)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        if d != d2 || self.targets.len() != n {
            candle_core::bail!(
                "linear cross entropy: hidden {n}×{d}, head {v}×{d2}, {} targets",
                self.targets.len()
            );
        }
        if let Some(&t) = self.targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("linear cross entropy: target {t} outside the vocabulary of {v}");
        }
        // logits = h · Wᵀ (every element is written by the GEMM, which does not read its destination)
        let mut logits = Vec::<f32>::with_capacity(n * v);
        let (vi, di) = (v as isize, d as isize);
        // SAFETY: shapes checked above; the GEMM (which does not read its destination) writes all n·v
        // elements of the reserved capacity, and only then does the length cover them.
        unsafe {
            sgemm(
                (n, v, d),
                logits.spare_capacity_mut().as_mut_ptr().cast::<f32>(),
                (vi, 1),
                h.as_ptr(),
                (di, 1),
                w.as_ptr(),
                (1, di),
                1.0,
            );
            logits.set_len(n * v);
        }
        // Per row: loss_i = lse(x_i) − x_{i,t_i}; then x_i ← (softmax(x_i) − onehot(t_i)) / N in place.
        let inv_n = 1.0 / n as f32;
        let mut row_loss = vec![0f64; n];
        logits
            .par_chunks_mut(v)
            .zip(self.targets.par_iter())
            .zip(row_loss.par_iter_mut())
            .for_each(|((row, &t), loss)| {
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let target = row[t as usize];
                for x in row.iter_mut() {
                    *x = exp_nonpositive(*x - m);
                }
                let s: f32 = row.iter().sum();
                *loss = (m + s.ln() - target) as f64;
                let scale = inv_n / s;
                for x in row.iter_mut() {
                    *x *= scale;
                }
                row[t as usize] -= inv_n;
            });
        // Summed in row order, so the loss does not depend on how rayon split the rows.
        let total: f64 = row_loss.iter().sum();
        *self.dlogits.lock().expect("dlogits lock") = Some(logits);
        Ok((
            CpuStorage::F32(vec![(total / n as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(dl) = self.dlogits.lock().expect("dlogits lock").take() else {
            candle_core::bail!("linear cross entropy: backward ran twice over one forward");
        };
        let beta = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let ((n, d), (v, _)) = (h.dims2()?, w.dims2()?);
        let (mut dh, mut dw) = (vec![0f32; n * d], vec![0f32; v * d]);
        let (hv, wv) = (cpu_f32::view(h), cpu_f32::view(w));
        let (hv, wv) = (hv.slice(OP)?, wv.slice(OP)?);
        let (vi, di) = (v as isize, d as isize);
        // SAFETY: shapes as in the forward; dh and dw are fresh buffers.
        unsafe {
            // ∂h = ∂logits · W
            sgemm(
                (n, d, v),
                dh.as_mut_ptr(),
                (di, 1),
                dl.as_ptr(),
                (vi, 1),
                wv.as_ptr(),
                (di, 1),
                beta,
            );
            // ∂W = ∂logitsᵀ · h
            sgemm(
                (v, d, n),
                dw.as_mut_ptr(),
                (di, 1),
                dl.as_ptr(),
                (1, vi),
                hv.as_ptr(),
                (di, 1),
                beta,
            );
        }
        let dev = h.device();
        Ok((
            Some(Tensor::from_vec(dh, (n, d), dev)?),
            Some(Tensor::from_vec(dw, (v, d), dev)?),
        ))
    }
}

/// Mean next-token cross entropy of the logits `hidden (N, D) · headᵀ` against `targets (N,)`. On CPU in f32
/// the head GEMM, the loss and its gradient are one fused op; elsewhere (CUDA, autocast) it is the
/// `precision::matmul` head followed by candle-nn's cross entropy.
pub fn linear_cross_entropy(hidden: &Tensor, head: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let fused = hidden.device().is_cpu()
        && hidden.dtype() == DType::F32
        && head.dtype() == DType::F32
        && precision::matmul_dtype() == DType::F32;
    if !fused {
        let logits = precision::matmul(hidden, &head.t()?)?;
        return candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, targets);
    }
    let op = LinearCrossEntropy {
        targets: targets.flatten_all()?.to_vec1::<u32>()?,
        dlogits: Mutex::new(None),
    };
    hidden.contiguous()?.apply_op2(&head.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fast_exp_is_accurate_on_the_nonpositive_axis() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -(i as f32) * 1e-3 * 0.9; // 0 … −180
            let (ours, exact) = (exp_nonpositive(x) as f64, (x as f64).exp());
            if exact > 1e-37 {
                worst = worst.max(((ours - exact) / exact).abs());
            } else {
                assert!(ours < 1e-37, "exp({x}) = {ours}");
            }
        }
        assert!(worst < 3e-7, "relative error {worst}");
    }

    #[test]
    fn linear_cross_entropy_matches_the_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        let h = Var::randn(0f32, 1.0, (9, 5), &dev)?;
        let w = Var::randn(0f32, 1.0, (13, 5), &dev)?;
        let t = Tensor::new(&[0u32, 3, 12, 12, 5, 1, 2, 7, 0], &dev)?;
        let ours = linear_cross_entropy(h.as_tensor(), w.as_tensor(), &t)?;
        let logits = h.as_tensor().matmul(&w.as_tensor().t()?)?;
        let reference = candle_nn::loss::cross_entropy(&logits, &t)?;
        let (a, b) = (ours.to_scalar::<f32>()?, reference.to_scalar::<f32>()?);
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        let ga = (ours * 0.5)?.backward()?;
        let gb = (reference * 0.5)?.backward()?;
        for v in [&h, &w] {
            let (x, y) = (
                ga.get(v.as_tensor()).unwrap(),
                gb.get(v.as_tensor()).unwrap(),
            );
            let diff = (x - y)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "gradients differ by {diff}");
        }
        // A target outside the vocabulary is an error, not a read out of bounds.
        let bad = Tensor::new(&[13u32; 9], &dev)?;
        assert!(linear_cross_entropy(h.as_tensor(), w.as_tensor(), &bad).is_err());
        Ok(())
    }
}
