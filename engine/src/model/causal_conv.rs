//! Depthwise causal 1-D convolution over time (the Mamba backbone of TTT-Linear (M), Sun et al. 2024
//! Sec. 3.1, as the authors' `nn.Conv1d(groups=D, padding=k−1)` cut to the sequence length):
//!
//! ```text
//! y_t = b + Σ_{j<k} w_j ⊙ x_{t−(k−1)+j}
//! ```
//!
//! Tokens before a chunk's start come from the carried tail (the last k−1 inputs), zeros at the start of a
//! sequence, so a sequence fed in chunks — or token by token — gives what one call gives.

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder};
use rayon::prelude::*;

use crate::cpu_f32;

#[derive(Debug, Clone)]
pub struct CausalConv {
    /// (D, k): channel c's kernel, oldest tap first.
    weight: Tensor,
    /// (D).
    bias: Tensor,
    kernel: usize,
}

impl CausalConv {
    /// Weights and bias U(±1/√k), PyTorch's default for this layer (the authors keep it).
    pub fn new(dim: usize, kernel: usize, vb: VarBuilder) -> Result<Self> {
        let bound = 1.0 / (kernel as f64).sqrt();
        let uniform = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        Ok(Self {
            weight: vb.get_with_hints((dim, kernel), "weight", uniform)?,
            bias: vb.get_with_hints(dim, "bias", uniform)?,
            kernel,
        })
    }

    /// x (B,T,D) behind its tail (B,k−1,D), zeros when `None`; and the tail after x.
    pub fn pad(&self, x: &Tensor, tail: Option<Tensor>) -> Result<(Tensor, Tensor)> {
        let (b, t, d) = x.dims3()?;
        let tail = match tail {
            Some(tail) => tail,
            None => Tensor::zeros((b, self.kernel - 1, d), x.dtype(), x.device())?,
        };
        let padded = Tensor::cat(&[&tail, x], 1)?;
        let next = padded.narrow(1, t, self.kernel - 1)?;
        Ok((padded, next))
    }

    /// y (B,T,D) from a padded input (B,T+k−1,D) (see [`CausalConv::pad`]).
    pub fn forward_padded(&self, padded: &Tensor) -> Result<Tensor> {
        if cpu_f32::is_cpu_f32(padded) && cpu_f32::is_cpu_f32(&self.weight) {
            return padded.contiguous()?.apply_op3(
                &self.weight.contiguous()?,
                &self.bias.contiguous()?,
                FusedCausalConv,
            );
        }
        let t = padded.dim(1)? + 1 - self.kernel;
        let mut y = self.bias.clone();
        for j in 0..self.kernel {
            let tap = self.weight.narrow(1, j, 1)?.squeeze(1)?;
            y = padded
                .narrow(1, j, t)?
                .broadcast_mul(&tap)?
                .broadcast_add(&y)?;
        }
        Ok(y)
    }

    /// The kernel (D, k) and bias (D), for the inference path.
    pub fn parts(&self) -> (&Tensor, &Tensor) {
        (&self.weight, &self.bias)
    }
}

/// The kernel (D, k) as taps (k, D): tap j of every channel contiguous, so the loops run over channels.
fn taps(w: &[f32], d: usize, k: usize) -> Vec<f32> {
    (0..k * d).map(|i| w[(i % d) * k + i / d]).collect()
}

/// Taps (k, D) back to the kernel's (D, k) layout.
fn taps_back(t: &[f32], d: usize, k: usize) -> Vec<f32> {
    (0..d * k).map(|i| t[(i % k) * d + i / k]).collect()
}

/// The convolution on CPU in f32, forward and backward one pass each (the composed form is k broadcast
/// multiply-adds, each with a reduction in its backward). Operands: padded input (B, T+k−1, D), kernel
/// (D, k), bias (D).
struct FusedCausalConv;

const OP: &str = "causal conv";

impl candle_core::CustomOp3 for FusedCausalConv {
    fn name(&self) -> &'static str {
        "causal-depthwise-conv"
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
            cpu_f32::slice(s1, l1, OP)?,
            cpu_f32::slice(s2, l2, OP)?,
            cpu_f32::slice(s3, l3, OP)?,
        );
        let (bs, tp, d) = l1.shape().dims3()?;
        let k = w.len() / d.max(1);
        let t = tp + 1 - k;
        let taps = taps(w, d, k);
        let mut y = vec![0f32; bs * t * d];
        y.par_chunks_mut(t * d)
            .zip(x.par_chunks(tp * d))
            .for_each(|(y, x)| {
                for (n, y) in y.chunks_exact_mut(d).enumerate() {
                    y.copy_from_slice(b);
                    for (j, tap) in taps.chunks_exact(d).enumerate() {
                        let x = &x[(n + j) * d..(n + j + 1) * d];
                        for ((y, x), w) in y.iter_mut().zip(x).zip(tap) {
                            *y += x * w;
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((bs, t, d))))
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
        let (bs, tp, d) = x.dims3()?;
        let dev = x.device().clone();
        let (xv, wv, gv) = (cpu_f32::view(x), cpu_f32::view(w), cpu_f32::view(&dy));
        let (x, w, g) = (xv.slice(OP)?, wv.slice(OP)?, gv.slice(OP)?);
        let k = w.len() / d.max(1);
        let t = tp + 1 - k;
        let mut dx = vec![0f32; x.len()];
        // Per sequence: ∂x and partial ∂w, ∂b (summed below in sequence order: thread-count independent).
        let taps = taps(w, d, k);
        let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(tp * d)
            .zip(x.par_chunks(tp * d).zip(g.par_chunks(t * d)))
            .map(|(dx, (x, g))| {
                // ∂w as (k, D) like the taps, transposed back below.
                let (mut dw, mut db) = (vec![0f32; k * d], vec![0f32; d]);
                for (n, g) in g.chunks_exact(d).enumerate() {
                    db.iter_mut().zip(g).for_each(|(db, g)| *db += g);
                    for (j, (tap, dw)) in
                        taps.chunks_exact(d).zip(dw.chunks_exact_mut(d)).enumerate()
                    {
                        let r = (n + j) * d..(n + j + 1) * d;
                        for (((dx, x), (w, dw)), g) in dx[r.clone()]
                            .iter_mut()
                            .zip(&x[r])
                            .zip(tap.iter().zip(dw.iter_mut()))
                            .zip(g)
                        {
                            *dx += w * g;
                            *dw += x * g;
                        }
                    }
                }
                (taps_back(&dw, d, k), db)
            })
            .collect();
        let dw = cpu_f32::sum_in_order(partial.iter().map(|p| &p.0), d * k);
        let db = cpu_f32::sum_in_order(partial.iter().map(|p| &p.1), d);
        Ok((
            Some(Tensor::from_vec(dx, (bs, tp, d), &dev)?),
            Some(Tensor::from_vec(dw, (d, k), &dev)?),
            Some(Tensor::from_vec(db, d, &dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    /// The fused f32 convolution against the composed one in f64: value and gradients.
    #[test]
    fn fused_matches_composed() -> Result<()> {
        use candle_core::Var;
        let dev = Device::Cpu;
        let x64 = crate::model::init::seeded_randn(61, 0.0, 1.0, (2, 9, 5), DType::F64, &dev)?;
        let up = crate::model::init::seeded_randn(62, 0.0, 1.0, (2, 6, 5), DType::F64, &dev)?;
        let mut got = Vec::new();
        for dtype in [DType::F32, DType::F64] {
            let vm = VarMap::new();
            let vb = crate::model::init::seeded_var_builder(&vm, 3, dtype, &dev);
            let conv = CausalConv::new(5, 4, vb.pp("c"))?;
            let x = Var::from_tensor(&x64.to_dtype(dtype)?)?;
            let y = conv.forward_padded(x.as_tensor())?;
            let grads = (&y * up.to_dtype(dtype)?)?.sum_all()?.backward()?;
            let mut out = vec![y.to_dtype(DType::F64)?];
            for t in [x.as_tensor(), &conv.weight, &conv.bias] {
                out.push(grads.get(t).expect("gradient").to_dtype(DType::F64)?);
            }
            got.push(out);
        }
        for (i, name) in ["value", "∂x", "∂w", "∂b"].iter().enumerate() {
            let diff = (&got[0][i] - &got[1][i])?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?;
            assert!(diff < 1e-5, "{name}: fused vs composed differ by {diff:e}");
        }
        Ok(())
    }

    #[test]
    fn equals_the_direct_sum_and_chunks_carry_the_tail() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = crate::model::init::seeded_var_builder(&vm, 3, DType::F64, &dev);
        let conv = CausalConv::new(3, 4, vb.pp("c"))?;
        let x = crate::model::init::seeded_randn(5, 0.0, 1.0, (2, 7, 3), DType::F64, &dev)?;
        let (padded, _) = conv.pad(&x, None)?;
        let y: Vec<Vec<Vec<f64>>> = conv.forward_padded(&padded)?.to_vec3()?;
        let (w, b): (Vec<Vec<f64>>, Vec<f64>) = (conv.weight.to_vec2()?, conv.bias.to_vec1()?);
        let xs: Vec<Vec<Vec<f64>>> = x.to_vec3()?;
        for (yb, xb) in y.iter().zip(&xs) {
            for (t, yt) in yb.iter().enumerate() {
                for (c, got) in yt.iter().enumerate() {
                    let mut want = b[c];
                    for (j, wj) in w[c].iter().enumerate() {
                        if let Some(s) = (t + j).checked_sub(3) {
                            want += wj * xb[s][c];
                        }
                    }
                    assert!((got - want).abs() < 1e-12);
                }
            }
        }
        // In chunks of 1, 2 and 4 tokens.
        let mut tail = None;
        let mut parts = Vec::new();
        for (s, l) in [(0usize, 1usize), (1, 2), (3, 4)] {
            let (p, next) = conv.pad(&x.narrow(1, s, l)?, tail)?;
            parts.push(conv.forward_padded(&p)?);
            tail = Some(next);
        }
        let chunked: Vec<Vec<Vec<f64>>> = Tensor::cat(&parts, 1)?.to_vec3()?;
        assert_eq!(chunked, y);
        Ok(())
    }
}
