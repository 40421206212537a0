//! SwiGLU feed-forward (Shazeer 2020): FFN(x) = W_down (silu(W_gate x) ⊙ W_up x).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::bit_linear::BitLinear;
use super::config::WeightKind;

#[derive(Debug, Clone)]
pub struct SwiGlu {
    gate: BitLinear,
    up: BitLinear,
    down: BitLinear,
}

impl SwiGlu {
    pub fn new(
        dim: usize,
        hidden: usize,
        kind: WeightKind,
        std: f64,
        out_std: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            gate: BitLinear::new(dim, hidden, kind, std, vb.pp("gate"))?,
            up: BitLinear::new(dim, hidden, kind, std, vb.pp("up"))?,
            down: BitLinear::new(hidden, dim, kind, out_std, vb.pp("down"))?,
        })
    }
}

impl Module for SwiGlu {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate.forward(x)?.silu()?;
        self.down.forward(&(g * self.up.forward(x)?)?)
    }
}
