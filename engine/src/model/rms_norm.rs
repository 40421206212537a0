//! RMSNorm (Zhang & Sennrich 2019): y = x / sqrt(mean(x²) + ε) · g, with a learned scale g.
//!
//! On CPU in f32 the forward and backward are one fused op each (candle's own fused op has no backward,
//! and the composed form costs five graph nodes and, for ∂g, a strided reduction over all rows);
//! elsewhere it is built from elementary ops so that autograd differentiates it.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor, D};
use candle_nn::{Init, VarBuilder};
use rayon::prelude::*;

use crate::cpu_f32;

/// Root-mean-square layer norm over the last dimension.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        Ok(Self { weight, eps })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 && self.weight.dtype() == DType::F32 {
            let op = FusedRmsNorm {
                eps: self.eps as f32,
            };
            return x.contiguous()?.apply_op2(&self.weight.contiguous()?, op);
        }
        // r = 1 / sqrt(mean(x²) + ε);  y = x · r · g
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (ms + self.eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&inv)?.broadcast_mul(&self.weight)
    }
}

/// Rows per parallel task; fixed, so that the ∂g partial sums (and so the result) do not depend on how
/// the work was split.
const ROWS_PER_TASK: usize = 64;

const OP: &str = "rms norm";

struct FusedRmsNorm {
    eps: f32,
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp2 for FusedRmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (cpu_f32::slice(s1, l1, OP)?, cpu_f32::slice(s2, l2, OP)?);
        let d = g.len();
        if l1.dims().last() != Some(&d) {
            candle_core::bail!("rms norm: input {:?} against a scale of {d}", l1.dims());
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK))
            .for_each(|(y, x)| {
                for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                    let r = inv_rms(x, self.eps);
                    for ((y, &x), &g) in y.iter_mut().zip(x).zip(g) {
                        *y = x * r * g;
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (shape, dev) = (x.shape().clone(), x.device().clone());
        let (x, g, dy) = (cpu_f32::view(x), cpu_f32::view(g), cpu_f32::view(&dy));
        let (x, g, dy) = (x.slice(OP)?, g.slice(OP)?, dy.slice(OP)?);
        let d = g.len();
        // With u = ∂y ⊙ g and r = 1/rms(x):  ∂x = r·u − x · r³ · (u·x)/D;  ∂g = Σ_rows ∂y ⊙ x·r.
        let mut dx = vec![0f32; x.len()];
        let partial_dg: Vec<Vec<f32>> = dx
            .par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK))
            .zip(dy.par_chunks(d * ROWS_PER_TASK))
            .map(|((dx, x), dy)| {
                let mut dg = vec![0f32; d];
                for ((dx, x), dy) in dx.chunks_mut(d).zip(x.chunks(d)).zip(dy.chunks(d)) {
                    let r = inv_rms(x, self.eps);
                    let ux: f32 = dy.iter().zip(g).zip(x).map(|((dy, g), x)| dy * g * x).sum();
                    let c = r * r * r * ux / d as f32;
                    for i in 0..d {
                        dx[i] = r * dy[i] * g[i] - x[i] * c;
                        dg[i] += dy[i] * x[i] * r;
                    }
                }
                dg
            })
            .collect();
        let dg = cpu_f32::sum_in_order(&partial_dg, d);
        Ok((
            Some(Tensor::from_vec(dx, shape, &dev)?),
            Some(Tensor::from_vec(dg, d, &dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_matches_composed_value_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 2.0, (3, 70, 12), &dev)?;
        let g = Var::randn(1f32, 0.3, 12, &dev)?;
        let norm = RmsNorm {
            weight: g.as_tensor().clone(),
            eps: 1e-5,
        };
        let fused = norm.forward(x.as_tensor())?;
        let ms = x.as_tensor().sqr()?.mean_keepdim(D::Minus1)?;
        let composed = x
            .as_tensor()
            .broadcast_mul(&(ms + 1e-5)?.sqrt()?.recip()?)?
            .broadcast_mul(g.as_tensor())?;
        let diff = (&fused - &composed)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "forward differs by {diff}");
        // A loss that weighs every output differently, so ∂y is not uniform.
        let w = crate::model::init::seeded_randn(106, 0.0, 1.0, (3, 70, 12), DType::F32, &dev)?;
        let ga = (fused * &w)?.sum_all()?.backward()?;
        let gb = (composed * &w)?.sum_all()?.backward()?;
        for v in [&x, &g] {
            let (a, b) = (
                ga.get(v.as_tensor()).unwrap(),
                gb.get(v.as_tensor()).unwrap(),
            );
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "gradients differ by {diff}");
        }
        Ok(())
    }
}
