//! Fused CPU f32 ops of the TTT layer, each with its backward: the inner RoPE (a rotation of interleaved
//! pairs), layer-norm's normalisation x̂ = (z − μ)/σ, the inner gradient and the post-norm. Elsewhere (CUDA, f64) the layer composes them from
//! candle ops; unit tests check the two against each other, values and gradients.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
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
pub(crate) fn moments(z: &[f32], eps: f32) -> (f32, f32) {
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

/// ∂ℓ/∂Z of the inner loss ℓ = ½‖γ ⊙ x̂(Z) − t‖² per row (t = target − β): g = (γ ⊙ x̂ − t) ⊙ γ,
/// ∂ℓ/∂Z = (g − mean(g) − x̂ · mean(g ⊙ x̂)) / σ — forward in one pass, and its backward (the inner loss's
/// second derivative) in one more, instead of some twenty graph nodes each way. Operands: Z, t, γ, all of
/// the same shape.
pub struct InnerGradZ {
    pub eps: f32,
}

const GRAD_OP: &str = "ttt inner gradient";

impl candle_core::CustomOp3 for InnerGradZ {
    fn name(&self) -> &'static str {
        "ttt-inner-grad-z"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (z, t, gamma) = (
            cpu_f32::slice(s1, l1, GRAD_OP)?,
            cpu_f32::slice(s2, l2, GRAD_OP)?,
            cpu_f32::slice(s3, l3, GRAD_OP)?,
        );
        if z.len() != t.len() || z.len() != gamma.len() {
            candle_core::bail!("{GRAD_OP}: operands of different sizes");
        }
        let d = *l1.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; z.len()];
        out.par_chunks_mut(d * ROWS)
            .enumerate()
            .for_each(|(c, out)| {
                let o = c * d * ROWS;
                let mut scratch = RowScratch::new(d);
                for (r, out) in out.chunks_exact_mut(d).enumerate() {
                    let a = o + r * d;
                    let (z, t, gm) = (&z[a..a + d], &t[a..a + d], &gamma[a..a + d]);
                    inner_grad_row(z, t, gm, self.eps, &mut scratch, out);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        z: &Tensor,
        t: &Tensor,
        gamma: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (shape, dev) = (z.shape().clone(), z.device().clone());
        let d = *shape.dims().last().unwrap_or(&1);
        let views = [
            cpu_f32::view(z),
            cpu_f32::view(t),
            cpu_f32::view(gamma),
            cpu_f32::view(&grad),
        ];
        let z = views[0].slice(GRAD_OP)?;
        let t = views[1].slice(GRAD_OP)?;
        let gamma = views[2].slice(GRAD_OP)?;
        let up = views[3].slice(GRAD_OP)?;
        let n = z.len();
        let (mut dz, mut dt, mut dg) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        dz.par_chunks_mut(d * ROWS)
            .zip(dt.par_chunks_mut(d * ROWS).zip(dg.par_chunks_mut(d * ROWS)))
            .enumerate()
            .for_each(|(c, (dz, (dt, dg)))| {
                let o = c * d * ROWS;
                let mut scratch = RowScratch::new(d);
                for (r, ((dz, dt), dg)) in dz
                    .chunks_exact_mut(d)
                    .zip(dt.chunks_exact_mut(d))
                    .zip(dg.chunks_exact_mut(d))
                    .enumerate()
                {
                    let a = o + r * d;
                    let r = a..a + d;
                    let (z, t, gm) = (&z[r.clone()], &t[r.clone()], &gamma[r.clone()]);
                    let up = &up[r];
                    inner_grad_row_backward(z, t, gm, up, self.eps, &mut scratch, dz, dt, dg);
                }
            });
        Ok((
            Some(Tensor::from_vec(dz, shape.clone(), &dev)?),
            Some(Tensor::from_vec(dt, shape.clone(), &dev)?),
            Some(Tensor::from_vec(dg, shape, &dev)?),
        ))
    }
}

/// One row of [`InnerGradZ`]: fills x̂ and g, writes u = g − mean(g) − x̂·mean(g ⊙ x̂) into `u` (∂ℓ/∂Z is
/// u/σ), returns (1/σ, mean(g ⊙ x̂)).
#[inline(always)]
fn row_forward(
    z: &[f32],
    t: &[f32],
    gamma: &[f32],
    eps: f32,
    x: &mut [f32],
    g: &mut [f32],
    u: &mut [f32],
) -> (f32, f32) {
    let d = z.len();
    let (mu, r) = moments(z, eps);
    for i in 0..d {
        x[i] = (z[i] - mu) * r;
        g[i] = (gamma[i] * x[i] - t[i]) * gamma[i];
    }
    let gm = g.iter().sum::<f32>() / d as f32;
    let gxm = g.iter().zip(x.iter()).map(|(g, x)| g * x).sum::<f32>() / d as f32;
    for i in 0..d {
        u[i] = g[i] - gm - x[i] * gxm;
    }
    (r, gxm)
}

/// Scratch rows for [`inner_grad_row_backward`].
pub(crate) struct RowScratch {
    x: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    big_a: Vec<f32>,
    big_x: Vec<f32>,
}

impl RowScratch {
    pub(crate) fn new(d: usize) -> Self {
        let row = || vec![0f32; d];
        Self {
            x: row(),
            g: row(),
            u: row(),
            big_a: row(),
            big_x: row(),
        }
    }
}

/// ∂ℓ/∂Z of one row (see [`InnerGradZ`]): writes it into `out`.
#[inline]
pub(crate) fn inner_grad_row(
    z: &[f32],
    t: &[f32],
    gamma: &[f32],
    eps: f32,
    scratch: &mut RowScratch,
    out: &mut [f32],
) {
    let (r, _) = row_forward(z, t, gamma, eps, &mut scratch.x, &mut scratch.g, out);
    out.iter_mut().for_each(|o| *o *= r);
}

/// The backward of one row of [`InnerGradZ`] (the inner loss's second derivative): given ∂L/∂G in `up`,
/// writes ∂L/∂z into `dz` and ∂L/∂t into `dt`, and adds ∂L/∂γ into `dgamma`.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) fn inner_grad_row_backward(
    z: &[f32],
    t: &[f32],
    gm: &[f32],
    up: &[f32],
    eps: f32,
    scratch: &mut RowScratch,
    dz: &mut [f32],
    dt: &mut [f32],
    dgamma: &mut [f32],
) {
    let d = z.len();
    let RowScratch {
        x,
        g,
        u,
        big_a,
        big_x,
    } = scratch;
    // Forward again: x̂, g, u = g − mean(g) − x̂ h with h = mean(g ⊙ x̂), and 1/σ.
    let (rs, h) = row_forward(z, t, gm, eps, x, g, u);
    let inv_d = 1.0 / d as f32;
    // a = r·G, s_r = Σ G ⊙ u.
    let s_r: f32 = up.iter().zip(u.iter()).map(|(g, u)| g * u).sum();
    let mean_a = up.iter().sum::<f32>() * rs * inv_d;
    let p = up.iter().zip(x.iter()).map(|(g, x)| g * x).sum::<f32>() * rs * inv_d;
    for i in 0..d {
        let a = rs * up[i];
        big_a[i] = a - mean_a - x[i] * p; // ∂L/∂g
        big_x[i] = big_a[i] * gm[i] * gm[i] - a * h - g[i] * p; // ∂L/∂x̂
        dt[i] = -big_a[i] * gm[i];
        dgamma[i] += big_a[i] * (2.0 * gm[i] * x[i] - t[i]);
    }
    let mx = big_x.iter().sum::<f32>() * inv_d;
    let mxx = big_x.iter().zip(x.iter()).map(|(a, b)| a * b).sum::<f32>() * inv_d;
    for i in 0..d {
        dz[i] = rs * (big_x[i] - mx - x[i] * mxx) - s_r * rs * rs * x[i] * inv_d;
    }
}

/// LayerNorm with scale and shift over the last dim, y = x̂ ⊙ w + b (the TTT post-norm): forward and
/// backward fused, the ∂w, ∂b row sums in fixed blocks (the result does not depend on the thread count).
pub struct AffineLayerNorm {
    pub eps: f32,
}

const LN_OP: &str = "ttt post-norm";

impl candle_core::CustomOp3 for AffineLayerNorm {
    fn name(&self) -> &'static str {
        "ttt-post-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (
            cpu_f32::slice(s1, l1, LN_OP)?,
            cpu_f32::slice(s2, l2, LN_OP)?,
            cpu_f32::slice(s3, l3, LN_OP)?,
        );
        let d = w.len();
        if l1.dims().last() != Some(&d) || b.len() != d {
            candle_core::bail!("{LN_OP}: input {:?} against a scale of {d}", l1.dims());
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d * ROWS)
            .zip(x.par_chunks(d * ROWS))
            .for_each(|(y, x)| {
                for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                    let (mu, r) = moments(x, self.eps);
                    for i in 0..d {
                        y[i] = (x[i] - mu) * r * w[i] + b[i];
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (shape, dev) = (x.shape().clone(), x.device().clone());
        let (xv, wv, gv) = (cpu_f32::view(x), cpu_f32::view(w), cpu_f32::view(&dy));
        let (x, w, g) = (xv.slice(LN_OP)?, wv.slice(LN_OP)?, gv.slice(LN_OP)?);
        let d = w.len();
        let mut dx = vec![0f32; x.len()];
        // ∂x = (u − mean(u) − x̂ · mean(u ⊙ x̂)) / σ with u = ∂y ⊙ w;  ∂w = Σ ∂y ⊙ x̂;  ∂b = Σ ∂y.
        let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(d * ROWS)
            .zip(x.par_chunks(d * ROWS).zip(g.par_chunks(d * ROWS)))
            .map(|(dx, (x, g))| {
                let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
                let mut xhat = vec![0f32; d];
                for (dx, (x, g)) in dx
                    .chunks_exact_mut(d)
                    .zip(x.chunks_exact(d).zip(g.chunks_exact(d)))
                {
                    let (mu, r) = moments(x, self.eps);
                    let (mut um, mut uxm) = (0f32, 0f32);
                    for i in 0..d {
                        xhat[i] = (x[i] - mu) * r;
                        let u = g[i] * w[i];
                        um += u;
                        uxm += u * xhat[i];
                        dw[i] += g[i] * xhat[i];
                        db[i] += g[i];
                    }
                    let (um, uxm) = (um / d as f32, uxm / d as f32);
                    for i in 0..d {
                        dx[i] = (g[i] * w[i] - um - xhat[i] * uxm) * r;
                    }
                }
                (dw, db)
            })
            .collect();
        let dw = cpu_f32::sum_in_order(partial.iter().map(|p| &p.0), d);
        let db = cpu_f32::sum_in_order(partial.iter().map(|p| &p.1), d);
        Ok((
            Some(Tensor::from_vec(dx, shape, &dev)?),
            Some(Tensor::from_vec(dw, d, &dev)?),
            Some(Tensor::from_vec(db, d, &dev)?),
        ))
    }
}
