//! One Bit-Llama block: x = x + Mixer(RMSNorm(x)); x = x + SwiGLU(RMSNorm(x)).
//! With the Mamba backbone (TTT-Linear (M), Sun et al. 2024 Sec. 3.1) a causal-convolution sub-block comes
//! first: x = x + Conv(RMSNorm(x)).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::{Attention, KvCache};
use super::causal_conv::CausalConv;
use super::config::{MixerKind, ModelConfig};
use super::rms_norm::RmsNorm;
use super::swiglu::SwiGlu;
use super::ttt_linear::{TttLinear, TttState};

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

/// The Mamba backbone's convolution sub-block: RMSNorm, then a depthwise causal convolution.
#[derive(Debug, Clone)]
struct PreConv {
    norm: RmsNorm,
    conv: CausalConv,
}

#[derive(Debug, Clone)]
pub struct Block {
    pre_conv: Option<PreConv>,
    norm1: RmsNorm,
    mixer: Mixer,
    norm2: RmsNorm,
    mlp: SwiGlu,
}

impl Block {
    pub fn new(cfg: &ModelConfig, std: f64, out_std: f64, vb: VarBuilder) -> Result<Self> {
        let mixer = match cfg.mixer {
            MixerKind::Ttt => Mixer::Ttt(TttLinear::new(cfg, std, out_std, vb.pp("mixer"))?),
            MixerKind::Attention => Mixer::Attention(Attention::new(
                cfg.dim,
                cfg.n_heads,
                cfg.linear_kind(),
                std,
                out_std,
                vb.pp("mixer"),
            )?),
        };
        let pre_conv = if cfg.mamba() {
            Some(PreConv {
                norm: RmsNorm::new(cfg.dim, cfg.norm_eps, vb.pp("pre_conv.norm"))?,
                conv: CausalConv::new(cfg.dim, cfg.ttt_conv_kernel, vb.pp("pre_conv.conv"))?,
            })
        } else {
            None
        };
        Ok(Self {
            pre_conv,
            norm1: RmsNorm::new(cfg.dim, cfg.norm_eps, vb.pp("norm1"))?,
            mixer,
            norm2: RmsNorm::new(cfg.dim, cfg.norm_eps, vb.pp("norm2"))?,
            mlp: SwiGlu::new(
                cfg.dim,
                cfg.mlp_hidden(),
                cfg.linear_kind(),
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
        // Mamba backbone: x = x + Conv(RMSNorm(x)), its input tail carried in the TTT state.
        let (x, state) = match (&self.pre_conv, &self.mixer) {
            (Some(pre), Mixer::Ttt(m)) => {
                let mut s = match state {
                    Some(MixerState::Ttt(s)) => s,
                    None => m.initial_state(x.dim(0)?)?,
                    Some(_) => candle_core::bail!("mixer state does not match the mixer kind"),
                };
                let (padded, tail) = pre.conv.pad(&pre.norm.forward(x)?, s.pre_tail.take())?;
                s.pre_tail = Some(tail);
                (
                    (x + pre.conv.forward_padded(&padded)?)?,
                    Some(MixerState::Ttt(s)),
                )
            }
            _ => (x.clone(), state),
        };
        let (mixed, state) = self
            .mixer
            .forward_with_state(&self.norm1.forward(&x)?, state)?;
        let x = (x + mixed)?;
        let x = (&x + self.mlp.forward(&self.norm2.forward(&x)?)?)?;
        Ok((x, state))
    }
}
