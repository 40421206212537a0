//! One Bit-Llama block: x = x + Mixer(RMSNorm(x)); x = x + SwiGLU(RMSNorm(x)).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::{Attention, KvCache};
use super::config::{MixerKind, ModelConfig};
use super::rms_norm::RmsNorm;
use super::swiglu::SwiGlu;
use super::ttt_linear::{TttLinear, TttState};

/// ε of the block RMSNorms.
pub const RMS_EPS: f64 = 1e-5;

#[derive(Debug, Clone)]
pub enum Mixer {
    Ttt(TttLinear),
    Attention(Attention),
}

/// What a mixer carries from one chunk of a sequence to the next.
#[derive(Debug, Clone)]
pub enum MixerState {
    Ttt(TttState),
    Attention(KvCache),
}

impl Mixer {
    fn forward_with_state(
        &self,
        x: &Tensor,
        state: Option<MixerState>,
    ) -> Result<(Tensor, MixerState)> {
        match (self, state) {
            (Mixer::Ttt(m), Some(MixerState::Ttt(s))) => m
                .forward_with_state(x, Some(s))
                .map(|(y, s)| (y, MixerState::Ttt(s))),
            (Mixer::Ttt(m), None) => m
                .forward_with_state(x, None)
                .map(|(y, s)| (y, MixerState::Ttt(s))),
            (Mixer::Attention(m), Some(MixerState::Attention(c))) => m
                .forward_with_cache(x, Some(c))
                .map(|(y, c)| (y, MixerState::Attention(c))),
            (Mixer::Attention(m), None) => m
                .forward_with_cache(x, None)
                .map(|(y, c)| (y, MixerState::Attention(c))),
            _ => candle_core::bail!("mixer state does not match the mixer kind"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Block {
    norm1: RmsNorm,
    mixer: Mixer,
    norm2: RmsNorm,
    mlp: SwiGlu,
}

impl Block {
    pub fn new(cfg: &ModelConfig, std: f64, out_std: f64, vb: VarBuilder) -> Result<Self> {
        let mixer = match cfg.mixer {
            MixerKind::Ttt => Mixer::Ttt(TttLinear::new(
                cfg.dim,
                cfg.n_heads,
                cfg.ttt_mini_batch,
                cfg.ttt_base_lr,
                cfg.weights,
                std,
                out_std,
                vb.pp("mixer"),
            )?),
            MixerKind::Attention => Mixer::Attention(Attention::new(
                cfg.dim,
                cfg.n_heads,
                cfg.weights,
                std,
                out_std,
                vb.pp("mixer"),
            )?),
        };
        Ok(Self {
            norm1: RmsNorm::new(cfg.dim, RMS_EPS, vb.pp("norm1"))?,
            mixer,
            norm2: RmsNorm::new(cfg.dim, RMS_EPS, vb.pp("norm2"))?,
            mlp: SwiGlu::new(
                cfg.dim,
                cfg.mlp_hidden(),
                cfg.weights,
                std,
                out_std,
                vb.pp("mlp"),
            )?,
        })
    }

    /// The block on a chunk, continuing the mixer's state.
    pub fn forward_with_state(
        &self,
        x: &Tensor,
        state: Option<MixerState>,
    ) -> Result<(Tensor, MixerState)> {
        let (mixed, state) = self
            .mixer
            .forward_with_state(&self.norm1.forward(x)?, state)?;
        let x = (x + mixed)?;
        let x = (&x + self.mlp.forward(&self.norm2.forward(&x)?)?)?;
        Ok((x, state))
    }
}
