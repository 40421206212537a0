//! `ModelConfig`: every architectural choice of a Bit-Llama model. Stored with every checkpoint.

use serde::{Deserialize, Serialize};

/// Which token mixer a block uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixerKind {
    /// TTT-Linear (Sun et al. 2024): a d×d linear hidden state per head trained at test time.
    Ttt,
    /// Causal multi-head softmax attention with RoPE.
    Attention,
}

/// Whether block linears are ternary (BitNet b1.58) or plain full-precision linears.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightKind {
    /// {-1, 0, +1}·γ weights, 8-bit activations, straight-through estimator.
    Ternary,
    /// Plain full-precision linears (for comparison in sweeps).
    Float,
}

impl std::fmt::Display for MixerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MixerKind::Ttt => "ttt",
            MixerKind::Attention => "attention",
        })
    }
}

impl std::fmt::Display for WeightKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightKind::Ternary => "ternary",
            WeightKind::Float => "float",
        })
    }
}

/// How the TTT inner step size depends on a token's place in its mini-batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenEta {
    /// The authors': token t (0-based inside its mini-batch) steps with 1/(t+1) plus a learned offset,
    /// clamped at 0 — W_t averages the mini-batch's gradients so far.
    Index,
    /// A plain sum of the gradients (the engine before 2026-12; token t's step is ~(t+1)× larger).
    None,
}

/// The sequence-modelling backbone around a TTT layer (Sun et al. 2024, Sec. 3.1 / Fig. 13).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backbone {
    /// RMSNorm → TTT → +residual, as a Transformer block (the authors' default config).
    Transformer,
    /// TTT-Linear (M): a depthwise causal convolution sub-block before the TTT layer, Q and K from one
    /// projection through their own causal convolutions, and a GELU gate on the output.
    Mamba,
}

/// How BitLinear guards its absmean / absmax scales against zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantEps {
    /// max(scale, 1e-5), as BitNet's code (and the PyTorch peer) clamp.
    Clamp,
    /// scale + 1e-5 (the engine before 2026-12).
    Add,
}

/// Values a model config takes when its file does not name the key: how checkpoints written before the
/// key existed were trained. Serialising skips a key at this value, so their config hash is unchanged.
mod legacy {
    use super::{Backbone, QuantEps, TokenEta};
    pub const NORM_EPS: f64 = 1e-5;
    pub const CONV_KERNEL: usize = 4;
    pub fn token_eta() -> TokenEta {
        TokenEta::None
    }
    pub fn is_token_eta(v: &TokenEta) -> bool {
        *v == token_eta()
    }
    pub fn backbone() -> Backbone {
        Backbone::Transformer
    }
    pub fn is_backbone(v: &Backbone) -> bool {
        *v == backbone()
    }
    pub fn quant_eps() -> QuantEps {
        QuantEps::Add
    }
    pub fn is_quant_eps(v: &QuantEps) -> bool {
        *v == quant_eps()
    }
    pub fn is_false(v: &bool) -> bool {
        !*v
    }
    pub fn norm_eps() -> f64 {
        NORM_EPS
    }
    pub fn is_norm_eps(v: &f64) -> bool {
        *v == NORM_EPS
    }
    pub fn conv_kernel() -> usize {
        CONV_KERNEL
    }
    pub fn is_conv_kernel(v: &usize) -> bool {
        *v == CONV_KERNEL
    }
}

/// A model configuration that fails validation.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("vocab_size must be at least 1 (got 0): point data_dir at a data_prep build")]
    ZeroVocab,
    #[error("{0} must be at least 1 (got 0)")]
    Zero(&'static str),
    #[error("dim = {dim} is not divisible by n_heads = {n_heads}: pick n_heads that divides dim")]
    HeadsDoNotDivide { dim: usize, n_heads: usize },
    #[error(
        "head size dim/n_heads = {0} is odd: RoPE in the attention mixer needs an even head size"
    )]
    OddHeadDim(usize),
    #[error("ttt_base_lr must be a finite number > 0 (got {0})")]
    BadTttLr(f64),
    #[error("norm_eps must be a finite number > 0 (got {0})")]
    BadNormEps(f64),
    #[error("head size dim/n_heads = {0} is odd: ttt_inner_rope needs an even head size (or set ttt_inner_rope = false)")]
    OddInnerRope(usize),
}

/// Every field of a Bit-Llama model (see the crate README for the architecture).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Tokenizer vocabulary size (from the data dir's `meta.json`).
    pub vocab_size: usize,
    /// Model width D.
    pub dim: usize,
    /// Number of blocks N.
    pub n_layers: usize,
    /// Heads H; head size d = D / H.
    pub n_heads: usize,
    /// Token mixer of every block.
    pub mixer: MixerKind,
    /// Ternary (BitLinear) or float block linears.
    pub weights: WeightKind,
    /// SwiGLU hidden size; `None` = 4·D rounded up to a multiple of 64.
    pub mlp_hidden: Option<usize>,
    /// TTT inner-loop mini-batch size b (tokens per inner gradient step).
    pub ttt_mini_batch: usize,
    /// TTT inner learning rate base η_base.
    pub ttt_base_lr: f64,
    /// Share the embedding matrix with the output head.
    pub tie_embeddings: bool,
    // The keys below came with the authors' TTT-Linear details (2026-12). A config that lacks one (a
    // checkpoint from before) means the behaviour it was trained with: see `legacy`.
    /// Token-index scaling of the TTT inner step.
    #[serde(
        default = "legacy::token_eta",
        skip_serializing_if = "legacy::is_token_eta"
    )]
    pub ttt_token_eta: TokenEta,
    /// A learned bias in θ_lr (one per head).
    #[serde(default, skip_serializing_if = "legacy::is_false")]
    pub ttt_lr_bias: bool,
    /// RoPE on the inner Q and K, at the position inside the mini-batch.
    #[serde(default, skip_serializing_if = "legacy::is_false")]
    pub ttt_inner_rope: bool,
    /// LayerNorm(D) on the TTT output before the output projection.
    #[serde(default, skip_serializing_if = "legacy::is_false")]
    pub ttt_post_norm: bool,
    /// Transformer or Mamba backbone around the TTT layer.
    #[serde(
        default = "legacy::backbone",
        skip_serializing_if = "legacy::is_backbone"
    )]
    pub ttt_backbone: Backbone,
    /// Kernel size of the Mamba backbone's causal convolutions.
    #[serde(
        default = "legacy::conv_kernel",
        skip_serializing_if = "legacy::is_conv_kernel"
    )]
    pub ttt_conv_kernel: usize,
    /// ε of every RMSNorm (blocks and final).
    #[serde(
        default = "legacy::norm_eps",
        skip_serializing_if = "legacy::is_norm_eps"
    )]
    pub norm_eps: f64,
    /// BitLinear's guard on its scales.
    #[serde(
        default = "legacy::quant_eps",
        skip_serializing_if = "legacy::is_quant_eps"
    )]
    pub quant_eps: QuantEps,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            vocab_size: 16_384,
            dim: 256,
            n_layers: 4,
            n_heads: 4,
            mixer: MixerKind::Ttt,
            weights: WeightKind::Ternary,
            mlp_hidden: None,
            ttt_mini_batch: 16,
            ttt_base_lr: 1.0,
            tie_embeddings: false,
            ttt_token_eta: TokenEta::Index,
            ttt_lr_bias: true,
            ttt_inner_rope: true,
            ttt_post_norm: true,
            ttt_backbone: Backbone::Transformer,
            ttt_conv_kernel: 4,
            norm_eps: 1e-6,
            quant_eps: QuantEps::Clamp,
        }
    }
}

impl ModelConfig {
    /// The same model with every authors'-detail key at the value of checkpoints written before those keys
    /// existed (the engine's first TTT definition).
    pub fn legacy(self) -> Self {
        Self {
            ttt_token_eta: legacy::token_eta(),
            ttt_lr_bias: false,
            ttt_inner_rope: false,
            ttt_post_norm: false,
            ttt_backbone: legacy::backbone(),
            ttt_conv_kernel: legacy::CONV_KERNEL,
            norm_eps: legacy::NORM_EPS,
            quant_eps: legacy::quant_eps(),
            ..self
        }
    }

    /// Ternary or float block linears, with this config's quantiser guard.
    pub fn linear_kind(&self) -> super::bit_linear::LinearKind {
        super::bit_linear::LinearKind {
            weights: self.weights,
            eps: self.quant_eps,
        }
    }

    /// Whether the TTT blocks use the Mamba backbone.
    pub fn mamba(&self) -> bool {
        self.mixer == MixerKind::Ttt && self.ttt_backbone == Backbone::Mamba
    }
}

/// Bytes per element of a training dtype name (`f32`, `bf16`, `f16`, `f64`).
pub fn dtype_bytes(dtype: &str) -> usize {
    match dtype {
        "f64" => 8,
        "bf16" | "f16" => 2,
        _ => 4,
    }
}

impl ModelConfig {
    /// Check that the configuration describes a model that can be built.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vocab_size == 0 {
            return Err(ConfigError::ZeroVocab);
        }
        for (name, v) in [
            ("dim", self.dim),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("ttt_mini_batch", self.ttt_mini_batch),
            ("ttt_conv_kernel", self.ttt_conv_kernel),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.mlp_hidden == Some(0) {
            return Err(ConfigError::Zero("mlp_hidden"));
        }
        if !self.dim.is_multiple_of(self.n_heads) {
            return Err(ConfigError::HeadsDoNotDivide {
                dim: self.dim,
                n_heads: self.n_heads,
            });
        }
        if self.mixer == MixerKind::Attention && self.head_dim() % 2 == 1 {
            return Err(ConfigError::OddHeadDim(self.head_dim()));
        }
        if !(self.ttt_base_lr.is_finite() && self.ttt_base_lr > 0.0) {
            return Err(ConfigError::BadTttLr(self.ttt_base_lr));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(ConfigError::BadNormEps(self.norm_eps));
        }
        if self.mixer == MixerKind::Ttt && self.ttt_inner_rope && self.head_dim() % 2 == 1 {
            return Err(ConfigError::OddInnerRope(self.head_dim()));
        }
        Ok(())
    }

    /// Head size d = D / H.
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }

    /// SwiGLU hidden size: `mlp_hidden`, or 4·D rounded up to a multiple of 64.
    pub fn mlp_hidden(&self) -> usize {
        self.mlp_hidden
            .unwrap_or(self.dim.saturating_mul(4).div_ceil(64).saturating_mul(64))
    }

    /// Parameters of one block's mixer. Counted in f64, exact below 2^53 (every term is a non-negative
    /// integer no larger than the sum), so that sizes no machine holds saturate instead of wrapping.
    fn mixer_params(&self) -> f64 {
        let (d_model, h, d) = (self.dim as f64, self.n_heads as f64, self.head_dim() as f64);
        match self.mixer {
            // θ_Q, θ_K, θ_V, θ_O + θ_lr (D→H) + W0 (H·d·d) + b0 (H·d) + inner LN γ, β (2·H·d), and the
            // options: θ_lr bias (H), token-η offsets (b), post-LN γ, β (2·D); Mamba: no θ_K but a gate
            // (D·D), Q and K convolutions (2·(D·k + D)) and the pre-convolution sub-block (D + D·k + D).
            MixerKind::Ttt => {
                let k = self.ttt_conv_kernel as f64;
                let mut n = 4.0 * d_model * d_model + d_model * h + h * d * d + 3.0 * h * d;
                n += if self.ttt_lr_bias { h } else { 0.0 };
                n += match self.ttt_token_eta {
                    TokenEta::Index => self.ttt_mini_batch as f64,
                    TokenEta::None => 0.0,
                };
                n += if self.ttt_post_norm {
                    2.0 * d_model
                } else {
                    0.0
                };
                if self.mamba() {
                    n += 2.0 * (d_model * k + d_model) + 2.0 * d_model + d_model * k;
                }
                n
            }
            MixerKind::Attention => 4.0 * d_model * d_model,
        }
    }

    /// Exact number of trainable scalars (equals the element count of the model's VarMap); a size past
    /// `usize` (no such model can be built) is `usize::MAX`.
    pub fn param_count(&self) -> usize {
        let n = self.param_count_f64();
        if n < (1u64 << 53) as f64 {
            n as usize
        } else {
            usize::MAX
        }
    }

    /// [`Self::param_count`] in f64 (exact below 2^53).
    fn param_count_f64(&self) -> f64 {
        let d_model = self.dim as f64;
        let vocab = self.vocab_size as f64;
        let block = 2.0 * d_model + self.mixer_params() + 3.0 * d_model * self.mlp_hidden() as f64;
        let head = if self.tie_embeddings {
            0.0
        } else {
            vocab * d_model
        };
        vocab * d_model + self.n_layers as f64 * block + d_model + head
    }

    /// Parameters outside the token embedding (the head counts, unless it is the embedding itself): the
    /// N of scaling laws that leave embeddings out (Kaplan et al. 2020).
    pub fn non_embedding_params(&self) -> usize {
        self.param_count()
            .saturating_sub(self.vocab_size.saturating_mul(self.dim))
    }

    /// Training FLOPs per token at context length `context` — forward and backward, the backward counted
    /// as twice the forward (Kaplan et al. 2020, Sec. 2.1; Hoffmann et al. 2022, App. F). Forward, per
    /// token: 2 per weight of every linear (block linears, θ_lr, the head; the embedding is a lookup);
    /// attention: QKᵀ and AV at the full context, 2·T·D each, as Chinchilla counts them (the causal mask
    /// halves what a kernel must do; the convention does not); TTT-Linear's dual form per head of size d
    /// and mini-batch b: K·W, Q·W and the state update Kᵀ·G (2·d² each) and the b×b scores and S·G (2·b·d
    /// each); causal convolutions (Mamba backbone): 2·k per channel. Norms, activations and softmax are
    /// left out (under 1% at these shapes).
    pub fn flops_per_token(&self, context: usize) -> f64 {
        let (d_model, h, hd) = (self.dim as f64, self.n_heads as f64, self.head_dim() as f64);
        let hidden = self.mlp_hidden() as f64;
        // Block linears: SwiGLU (3·D·hidden) and the mixer's projections.
        let mixer_linears = match self.mixer {
            MixerKind::Attention => 4.0 * d_model * d_model,
            MixerKind::Ttt => {
                // θ_Q, θ_V, θ_O and θ_K or (Mamba) the gate θ_G, plus θ_lr (D → H).
                4.0 * d_model * d_model + d_model * h
            }
        };
        let sequence = match self.mixer {
            MixerKind::Attention => 2.0 * 2.0 * context as f64 * d_model,
            MixerKind::Ttt => {
                let b = (self.ttt_mini_batch.min(context.max(1))) as f64;
                h * (3.0 * 2.0 * hd * hd + 2.0 * 2.0 * b * hd)
            }
        };
        let convs = if self.mixer == MixerKind::Ttt && self.mamba() {
            3.0 * 2.0 * self.ttt_conv_kernel as f64 * d_model
        } else {
            0.0
        };
        let per_block = 2.0 * (mixer_linears + 3.0 * d_model * hidden) + sequence + convs;
        let head = 2.0 * d_model * self.vocab_size as f64;
        3.0 * (self.n_layers as f64 * per_block + head)
    }

    /// Rough peak memory in bytes of one training step at (batch, context, dtype): weights, gradients and
    /// AdamW moments in f32 plus the activations kept for backward. An estimate (within ~2×), meant for
    /// refusing configurations that cannot fit a device, not for accounting.
    pub fn training_memory_estimate(&self, batch: usize, context: usize, dtype: &str) -> u64 {
        // In f64 (exact below 2^53 bytes), saturating to u64::MAX: an absurd size is an absurd estimate
        // (the run is skipped), never a wrap to a small one.
        let p = self.param_count_f64();
        let act_bytes = dtype_bytes(dtype) as f64;
        // f32 master weights + grads + two Adam moments, plus a low-precision copy when not f32.
        let states = p * 16.0 + if act_bytes < 4.0 { p * act_bytes } else { 0.0 };
        let (b, t, d) = (batch as f64, context as f64, self.dim as f64);
        let hidden = self.mlp_hidden() as f64;
        let h = self.n_heads as f64;
        let hd = self.head_dim() as f64;
        // Per block, activations saved for backward (counted in elements): norms, projections,
        // quantised copies, SwiGLU intermediates, and the mixer's own.
        let mixer = match self.mixer {
            MixerKind::Ttt => {
                let mb = (self.ttt_mini_batch as f64).max(1.0);
                // Q, K, V, targets, inner LN intermediates, and per mini-batch the b×b attention-like
                // matrix plus the carried d×d state.
                b * t * d * 14.0 + b * h * t * mb * 3.0 + b * h * (t / mb).ceil() * hd * hd * 2.0
            }
            MixerKind::Attention => b * t * d * 8.0 + b * h * t * t * 3.0,
        };
        let block = b * t * d * 10.0 + b * t * hidden * 6.0 + mixer;
        let logits = b * t * self.vocab_size as f64 * 3.0;
        let activations =
            (self.n_layers as f64 * block + b * t * d * 4.0) * act_bytes + logits * 4.0;
        // `as` saturates (and maps NaN to 0, which no finite size gives).
        (states + activations) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_problem() {
        let ok = ModelConfig::default();
        assert!(ok.validate().is_ok());
        let bad = ModelConfig {
            dim: 250,
            ..ok.clone()
        };
        let msg = bad.validate().unwrap_err().to_string();
        assert!(
            msg.contains("dim = 250") && msg.contains("n_heads = 4"),
            "{msg}"
        );
        let bad = ModelConfig {
            ttt_mini_batch: 0,
            ..ok.clone()
        };
        assert_eq!(bad.validate(), Err(ConfigError::Zero("ttt_mini_batch")));
        let bad = ModelConfig {
            vocab_size: 0,
            ..ok.clone()
        };
        assert_eq!(bad.validate(), Err(ConfigError::ZeroVocab));
        let bad = ModelConfig {
            ttt_base_lr: f64::NAN,
            ..ok
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn mlp_hidden_rounds_to_64() {
        let c = ModelConfig {
            dim: 100,
            n_heads: 4,
            ..Default::default()
        };
        assert_eq!(c.mlp_hidden(), 448);
    }

    #[test]
    fn memory_estimate_grows_with_batch_and_context() {
        let c = ModelConfig::default();
        let small = c.training_memory_estimate(8, 128, "f32");
        assert!(small > c.param_count() as u64 * 16);
        assert!(c.training_memory_estimate(16, 128, "f32") > small);
        assert!(c.training_memory_estimate(8, 256, "f32") > small);
        // Sizes past any machine saturate instead of wrapping around to small (or negative) numbers.
        let absurd = ModelConfig {
            dim: 1 << 62,
            n_heads: 1,
            ..Default::default()
        };
        assert_eq!(absurd.param_count(), usize::MAX);
        assert_eq!(absurd.training_memory_estimate(8, 128, "f32"), u64::MAX);
    }
}
