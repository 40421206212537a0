//! Fused CPU f32 ops of the TTT layer, each with its backward: the inner RoPE (a rotation of interleaved
//! pairs) and layer-norm's normalisation x̂ = (z − μ)/σ. Elsewhere (CUDA, f64) the layer composes them from
//! candle ops; unit tests check the two against each other, values and gradients.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu_f32;

/// Rotate interleaved pairs (x₂ᵢ, x₂ᵢ₊₁) of x (…, T, d) by the angle of (token t, pair i): cos, sin are T × d/2.
pub struct PairRotation {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl CustomOp1 for PairRotation {
    fn name(&self) -> &'static str {
        "ttt-inner-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32::slice(s, l, "inner rope")?;
        let dims = l.dims();
        let d = dims[dims.len() - 1];
        let half = d / 2;
        let t = dims[dims.len() - 2];
        if self.cos.len() != t * half || d % 2 == 1 {
            candle_core::bail!(
                "inner rope: tables for {} pairs, input {dims:?}",
                self.cos.len()
            );
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(t * d)
            .zip(x.par_chunks(t * d))
            .for_each(|(y, x)| {
                for (n, (y, x)) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)).enumerate() {
                    let (c, s) = (&self.cos[n * half..], &self.sin[n * half..]);
                    for i in 0..half {
                        let (a, b) = (x[2 * i], x[2 * i + 1]);
                        y[2 * i] = a * c[i] - b * s[i];
                        y[2 * i + 1] = a * s[i] + b * c[i];
                    }
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        // A rotation's transpose is the rotation by −angle.
        let back = PairRotation {
            cos: self.cos.clone(),
            sin: self.sin.iter().map(|s| -s).collect(),
        };
        Ok(Some(dy.contiguous()?.apply_op1(back)?))
    }
}

/// x̂ = (z − mean(z)) / sqrt(var(z) + ε) over the last dim.
pub struct Normalize {
    pub eps: f32,
}

/// (mean, 1/σ) of one row.
fn moments(z: &[f32], eps: f32) -> (f32, f32) {
    let n = z.len() as f32;
    let mu = z.iter().sum::<f32>() / n;
    let var = z.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / n;
    (mu, 1.0 / (var + eps).sqrt())
}

/// Rows per parallel task.
const ROWS: usize = 256;

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        "ttt-normalize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let z = cpu_f32::slice(s, l, "normalize")?;
        let d = *l.dims().last().unwrap_or(&1);
        let mut y = vec![0f32; z.len()];
        y.par_chunks_mut(d * ROWS)
            .zip(z.par_chunks(d * ROWS))
            .for_each(|(y, z)| {
                for (y, z) in y.chunks_exact_mut(d).zip(z.chunks_exact(d)) {
                    let (mu, r) = moments(z, self.eps);
                    for (y, z) in y.iter_mut().zip(z) {
                        *y = (z - mu) * r;
                    }
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, z: &Tensor, xhat: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dy = dy.contiguous()?;
        let (shape, dev) = (z.shape().clone(), z.device().clone());
        let d = *shape.dims().last().unwrap_or(&1);
        let (zv, xv, gv) = (cpu_f32::view(z), cpu_f32::view(xhat), cpu_f32::view(&dy));
        let (z, xhat, g) = (
            zv.slice("normalize")?,
            xv.slice("normalize")?,
            gv.slice("normalize")?,
        );
        // ∂z = (g − mean(g) − x̂ · mean(g ⊙ x̂)) / σ
        let mut dz = vec![0f32; z.len()];
        dz.par_chunks_mut(d * ROWS)
            .zip(z.par_chunks(d * ROWS))
            .zip(xhat.par_chunks(d * ROWS).zip(g.par_chunks(d * ROWS)))
            .for_each(|((dz, z), (xhat, g))| {
                for ((dz, z), (x, g)) in dz
                    .chunks_exact_mut(d)
                    .zip(z.chunks_exact(d))
                    .zip(xhat.chunks_exact(d).zip(g.chunks_exact(d)))
                {
                    let (_, r) = moments(z, self.eps);
                    let gm = g.iter().sum::<f32>() / d as f32;
                    let gxm = g.iter().zip(x).map(|(g, x)| g * x).sum::<f32>() / d as f32;
                    for i in 0..d {
                        dz[i] = (g[i] - gm - x[i] * gxm) * r;
                    }
                }
            });
        Ok(Some(Tensor::from_vec(dz, shape, &dev)?))
    }
}

/// Whether the fused ops apply to `x`.
pub fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}
