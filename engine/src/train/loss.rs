//! Next-token cross entropy, fused on CPU: one pass per row for log-sum-exp in the forward, softmax minus the
//! one-hot target in the backward. Over a 16k vocabulary the logits are the largest tensor of a step, and
//! the composed `log_softmax` + `nll` makes several full-size temporaries; this makes none in the forward.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct FusedCrossEntropy;

impl CustomOp2 for FusedCrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(logits), CpuStorage::U32(targets)) = (s1, s2) else {
            candle_core::bail!("fused cross entropy takes f32 logits and u32 targets");
        };
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("fused cross entropy needs contiguous inputs");
        };
        let (logits, targets) = (&logits[a0..a1], &targets[b0..b1]);
        let (n, v) = l1.shape().dims2()?;
        if targets.len() != n {
            candle_core::bail!(
                "fused cross entropy: {n} rows of logits but {} targets",
                targets.len()
            );
        }
        let total: f64 = logits
            .par_chunks(v)
            .zip(targets.par_iter())
            .map(|(row, &t)| {
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let s: f32 = row.iter().map(|x| (x - m).exp()).sum();
                (m + s.ln() - row[t as usize]) as f64
            })
            .sum();
        Ok((
            CpuStorage::F32(vec![(total / n as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // ∂/∂logits mean_i(lse_i − x_{i,t_i}) = (softmax(x) − onehot(t)) / N
        let n = logits.dim(0)?;
        let p = candle_nn::ops::softmax_last_dim(logits)?;
        let idx = targets.unsqueeze(1)?;
        let minus_one = Tensor::full(-1f32, (n, 1), logits.device())?;
        let g = p.scatter_add(&idx, &minus_one, 1)?;
        let scale = (grad.to_dtype(DType::F32)? / n as f64)?;
        Ok((Some(g.broadcast_mul(&scale)?), None))
    }
}

/// Mean cross entropy of logits (N, V) against targets (N,): fused on CPU for f32, candle-nn's elsewhere.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.device().is_cpu() && logits.dtype() == DType::F32 && logits.rank() == 2 {
        logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, FusedCrossEntropy)
    } else {
        candle_nn::loss::cross_entropy(logits, targets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candle_nn_value_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 3.0, (7, 11), &dev)?;
        let t = Tensor::new(&[0u32, 3, 10, 10, 5, 1, 2], &dev)?;
        let ours = cross_entropy(x.as_tensor(), &t)?;
        let reference = candle_nn::loss::cross_entropy(x.as_tensor(), &t)?;
        let (a, b) = (ours.to_scalar::<f32>()?, reference.to_scalar::<f32>()?);
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        let ga = (ours * 2.0)?
            .backward()?
            .get(x.as_tensor())
            .expect("grad")
            .clone();
        let gb = (reference * 2.0)?
            .backward()?
            .get(x.as_tensor())
            .expect("grad")
            .clone();
        let diff = (ga - gb)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "gradients differ by {diff}");
        Ok(())
    }
}
