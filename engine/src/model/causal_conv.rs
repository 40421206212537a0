//! Depthwise causal 1-D convolution over time (the Mamba backbone of TTT-Linear (M), Sun et al. 2024
//! Sec. 3.1, as the authors' `nn.Conv1d(groups=D, padding=k−1)` cut to the sequence length):
//!
//! ```text
//! y_t = b + Σ_{j<k} w_j ⊙ x_{t−(k−1)+j}
//! ```
//!
//! Tokens before a chunk's start come from the carried tail (the last k−1 inputs), zeros at the start of a
//! sequence, so a sequence fed in chunks — or token by token — gives what one call gives.

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

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
