//! SwiGLU feed-forward (Shazeer 2020): FFN(x) = W_down (silu(W_gate x) ⊙ W_up x).
//!
//! The gate silu(a) ⊙ b is [`super::gate`]'s (one fused op on CPU in f32).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::bit_linear::{BitLinear, LinearKind};
use super::gate::{gate, Silu};

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
        kind: impl Into<LinearKind>,
        std: f64,
        out_std: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let kind = kind.into();
        Ok(Self {
            gate: BitLinear::new(dim, hidden, kind, std, vb.pp("gate"))?,
            up: BitLinear::new(dim, hidden, kind, std, vb.pp("up"))?,
            down: BitLinear::new(hidden, dim, kind, out_std, vb.pp("down"))?,
        })
    }
}

impl Module for SwiGlu {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (a, b) = (self.gate.forward(x)?, self.up.forward(x)?);
        self.down.forward(&gate::<Silu>(&a, &b)?)
    }
}
