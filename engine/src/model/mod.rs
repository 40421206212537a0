//! Bit-Llama: token embedding → N × [RMSNorm → mixer → +residual; RMSNorm → SwiGLU → +residual]
//! → RMSNorm → linear head. Block linears are BitLinear (ternary weights, 8-bit activations).

pub mod attention;
pub mod bit_linear;
pub mod block;
pub mod causal_conv;
pub mod config;
pub mod dual_scan;
pub mod gate;
pub mod init;
pub mod precision;
pub mod rms_norm;
pub mod swiglu;
pub mod ttt_linear;
pub mod ttt_ops;

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

pub use block::{Block, MixerState};
pub use config::{Backbone, ConfigError, MixerKind, ModelConfig, QuantEps, TokenEta, WeightKind};
pub use init::build_seeded;

/// Standard deviation of the weight initialisation (GPT-2).
pub const INIT_STD: f64 = 0.02;

/// The Bit-Llama language model.
#[derive(Debug, Clone)]
pub struct BitLlama {
    embed: Tensor,
    blocks: Vec<Block>,
    norm: rms_norm::RmsNorm,
    /// Output head (V, D); the embedding when tied.
    head: Tensor,
    cfg: ModelConfig,
}

/// Per-block mixer states of a batch of sequences (TTT hidden states or KV caches).
pub type ModelState = Vec<MixerState>;

impl BitLlama {
    /// Build the model; parameters are created (or loaded) through `vb` by name.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let normal = Init::Randn {
            mean: 0.0,
            stdev: INIT_STD,
        };
        let embed = vb.get_with_hints((cfg.vocab_size, cfg.dim), "embed.weight", normal)?;
        // Residual-branch output projections scaled by 1/√(2N) (GPT-2).
        let out_std = INIT_STD / (2.0 * cfg.n_layers as f64).sqrt();
        let blocks = (0..cfg.n_layers)
            .map(|i| Block::new(cfg, INIT_STD, out_std, vb.pp(format!("blocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let norm = rms_norm::RmsNorm::new(cfg.dim, cfg.norm_eps, vb.pp("norm"))?;
        let head = if cfg.tie_embeddings {
            embed.clone()
        } else {
            vb.get_with_hints((cfg.vocab_size, cfg.dim), "head.weight", normal)?
        };
        Ok(Self {
            embed,
            blocks,
            norm,
            head,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Logits (B,T,V) for token ids (B,T), continuing from `state` (None = start of the sequences).
    pub fn forward_with_state(
        &self,
        ids: &Tensor,
        state: Option<ModelState>,
    ) -> Result<(Tensor, ModelState)> {
        let (b, t) = ids.dims2()?;
        let (x, states) = self.hidden_with_state(ids, state)?;
        let logits = precision::matmul(&x, &self.head.t()?)?;
        Ok((logits.reshape((b, t, self.cfg.vocab_size))?, states))
    }

    /// The final normed hidden states (B·T, D) that the head turns into logits.
    pub fn hidden_with_state(
        &self,
        ids: &Tensor,
        state: Option<ModelState>,
    ) -> Result<(Tensor, ModelState)> {
        let (b, t) = ids.dims2()?;
        let mut x =
            self.embed
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, t, self.cfg.dim))?;
        let mut states: Vec<Option<MixerState>> = match state {
            Some(s) => s.into_iter().map(Some).collect(),
            None => vec![None; self.blocks.len()],
        };
        let mut new_states = Vec::with_capacity(self.blocks.len());
        for (block, s) in self.blocks.iter().zip(states.iter_mut()) {
            let (y, ns) = block.forward_with_state(&x, s.take())?;
            x = y;
            new_states.push(ns);
        }
        let x = self.norm.forward(&x)?;
        Ok((x.reshape((b * t, self.cfg.dim))?, new_states))
    }

    /// The output head (V, D): the embedding when tied.
    pub fn head(&self) -> &Tensor {
        &self.head
    }
}

impl Module for BitLlama {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_state(ids, None)?.0)
    }
}

#[cfg(test)]
mod tests;
