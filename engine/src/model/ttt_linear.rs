//! TTT-Linear (Sun et al. 2024, "Learning to (Learn at Test Time): RNNs with Expressive Hidden States",
//! arXiv 2407.04620), computed in the dual form, as the authors' `ttt-lm-pytorch` defines it.
//!
//! Per head the hidden state is a d×d matrix W and bias b. For each token the inner model
//! f(k) = k + LN(k W + b) takes a gradient step on the self-supervised loss ℓ = ½‖f(θ_K x) − θ_V x‖²
//! (Sec. 2.1, eq. 3–4, with the residual + LN inner model of Sec. 2.7), and the output is f(θ_Q x) (eq. 5).
//! Tokens are grouped in mini-batches of b tokens; all gradients of a mini-batch are taken at the W of its
//! start (Sec. 2.4, eq. 6–7):
//!
//! ```text
//! W_t = W_0 − τ_t Σ_{s≤t} η_s ∇ℓ_s(W_0),   η_s = η_base · sigmoid(θ_lr x_s + β_lr) / d   (Sec. 2.7)
//! ```
//!
//! with the token-index scale τ_t = max(0, 1/(t+1) + learned offset_t), t counted inside the mini-batch
//! (`ttt_token_eta = "index"`; "none" sets τ ≡ 1). The dual form (Sec. 2.5) computes the outputs of a whole
//! mini-batch with matmuls instead of materialising every W_t. Q and K carry RoPE at their position inside
//! the mini-batch (`ttt_inner_rope`), the output passes a LayerNorm before θ_O (`ttt_post_norm`), and the
//! Mamba backbone (`ttt_backbone = "mamba"`) takes Q and K from one projection through two causal
//! convolutions and gates the output with GELU(θ_G x).
//!
//! Training's case — whole mini-batches from a mini-batch start — runs on the CPU in f32 as one fused op
//! with a hand-written backward ([`super::dual_scan`]); elsewhere (CUDA, f64, chunks that start or end inside
//! a mini-batch) the same equations are composed from candle ops, and tests hold the two to each other.

use std::sync::Arc;

use candle_core::{CustomOp1, Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

use super::bit_linear::BitLinear;
use super::causal_conv::CausalConv;
use super::config::{ModelConfig, TokenEta};
use super::dual_scan::DualScan;
use super::gate::{gate, Gelu};
use super::ttt_ops;
use crate::cpu_f32::is_cpu_f32;

/// ε of the inner model's layer norm and of the post-norm (the authors').
pub const INNER_LN_EPS: f64 = 1e-6;
/// RoPE base of the inner Q/K (the authors' `rope_theta`).
pub const INNER_ROPE_THETA: f64 = 10_000.0;

/// The carried hidden state of a TTT layer for a batch of sequences: what a chunked forward pass or a
/// token-by-token decoder needs to continue exactly where the previous chunk stopped (O(1) in length).
#[derive(Debug, Clone)]
pub struct TttState {
    /// W, b at the start of the current mini-batch: inner gradients are taken here. (B,H,d,d), (B,H,1,d).
    pub w_base: Tensor,
    pub b_base: Tensor,
    /// Σ η_s k_sᵀ ∇Z_s and Σ η_s ∇Z_s over the tokens of the current mini-batch seen so far (`None` at its
    /// start): W_t = W_base − τ_t · acc_w.
    pub acc: Option<(Tensor, Tensor)>,
    /// How many tokens of the current mini-batch have been seen (0 ≤ pos < mini-batch size).
    pub pos: usize,
    /// Mamba backbone: the last k−1 rows of the shared Q/K projection (the convolutions' input) and of the
    /// block's pre-convolution input, (B,k−1,D) each.
    pub qk_tail: Option<Tensor>,
    pub pre_tail: Option<Tensor>,
}

impl TttState {
    /// Detach from the autograd graph (e.g. to carry a state across training windows).
    pub fn detach(&self) -> Self {
        Self {
            w_base: self.w_base.detach(),
            b_base: self.b_base.detach(),
            acc: self.acc.as_ref().map(|(w, b)| (w.detach(), b.detach())),
            pos: self.pos,
            qk_tail: self.qk_tail.as_ref().map(Tensor::detach),
            pre_tail: self.pre_tail.as_ref().map(Tensor::detach),
        }
    }
}

/// The Mamba backbone's parts inside the TTT layer.
#[derive(Debug, Clone)]
struct MambaParts {
    conv_q: CausalConv,
    conv_k: CausalConv,
    /// θ_G: the gate's projection.
    gate: BitLinear,
}

/// A TTT-Linear token mixer.
#[derive(Debug, Clone)]
pub struct TttLinear {
    q: BitLinear,
    /// θ_K; `None` with the Mamba backbone (K is a convolution of θ_Q x).
    k: Option<BitLinear>,
    v: BitLinear,
    o: BitLinear,
    mamba: Option<MambaParts>,
    /// θ_lr: (H, D), a plain float projection to one learning-rate logit per head, and its bias (H).
    lr: Tensor,
    lr_bias: Option<Tensor>,
    /// Learned offsets of the token-index scale τ (b); `None` with `ttt_token_eta = "none"`.
    token_offset: Option<Tensor>,
    /// Learned initial state W0 (H,d,d), b0 (H,1,d).
    w0: Tensor,
    b0: Tensor,
    /// Inner layer norm scale and shift, (H,1,d).
    ln_weight: Tensor,
    ln_bias: Tensor,
    /// LayerNorm(D) before θ_O: scale, shift.
    post_norm: Option<(Tensor, Tensor)>,
    inner_rope: bool,
    n_heads: usize,
    head_dim: usize,
    mini_batch: usize,
    base_lr: f64,
}

/// Scale and shift of the inner layer norm: per head (H,1,d), or already broadcast to (B,H,m,d).
struct LnParams {
    weight: Tensor,
    bias: Tensor,
}

impl LnParams {
    fn of(layer: &TttLinear) -> Self {
        Self {
            weight: layer.ln_weight.clone(),
            bias: layer.ln_bias.clone(),
        }
    }

    /// LN(z) = normalize(z) · scale + shift.
    fn layer_norm(&self, z: &Tensor) -> Result<Tensor> {
        self.apply(&normalized(z)?)
    }

    /// x̂ · scale + shift.
    fn apply(&self, xhat: &Tensor) -> Result<Tensor> {
        xhat.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }

    fn broadcast(&self, shape: (usize, usize, usize, usize)) -> Result<Self> {
        Ok(Self {
            weight: self.weight.broadcast_as(shape)?.contiguous()?,
            bias: self.bias.broadcast_as(shape)?.contiguous()?,
        })
    }
}

/// x̂ = (z − μ)/σ over the last dim (one fused op on CPU in f32).
fn normalized(z: &Tensor) -> Result<Tensor> {
    if is_cpu_f32(z) {
        return z.contiguous()?.apply_op1(ttt_ops::Normalize {
            eps: INNER_LN_EPS as f32,
        });
    }
    Ok(normalize(z)?.0)
}

/// Layer-norm pieces over the last dim: x̂ = (z − μ)/σ and 1/σ.
fn normalize(z: &Tensor) -> Result<(Tensor, Tensor)> {
    let mu = z.mean_keepdim(D::Minus1)?;
    let centered = z.broadcast_sub(&mu)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_std = (var + INNER_LN_EPS)?.sqrt()?.recip()?;
    Ok((centered.broadcast_mul(&inv_std)?, inv_std))
}

/// cos, sin (T × d/2) of the inner RoPE for tokens at mini-batch positions (first + i) mod b (training and
/// the inference path use these same tables).
pub(crate) fn inner_rope_angles(
    t: usize,
    first: usize,
    mini_batch: usize,
    d: usize,
) -> (Vec<f64>, Vec<f64>) {
    let half = d / 2;
    // One row per position inside a mini-batch (at most b distinct ones), then one row per token.
    let rows = mini_batch.min(t);
    let (mut cos_b, mut sin_b) = (vec![0f64; mini_batch * half], vec![0f64; mini_batch * half]);
    for i in 0..rows {
        let p = (first + i) % mini_batch;
        for j in 0..half {
            let angle = p as f64 * INNER_ROPE_THETA.powf(-((2 * j) as f64) / d as f64);
            (cos_b[p * half + j], sin_b[p * half + j]) = (angle.cos(), angle.sin());
        }
    }
    let (mut cos, mut sin) = (Vec::with_capacity(t * half), Vec::with_capacity(t * half));
    for i in 0..t {
        let p = (first + i) % mini_batch;
        cos.extend_from_slice(&cos_b[p * half..(p + 1) * half]);
        sin.extend_from_slice(&sin_b[p * half..(p + 1) * half]);
    }
    (cos, sin)
}

/// RoPE on interleaved pairs (x₂ᵢ, x₂ᵢ₊₁) of (B,H,T,d) tensors at mini-batch positions — the authors'
/// `permute_qk`, rotate-half RoPE, `undo_permute_qk` in one. The tables are made once for Q and K.
enum InnerRope {
    /// The fused CPU op (f32), shared by the Q and K nodes of the graph.
    Fused(Arc<Box<dyn CustomOp1 + Send + Sync>>),
    /// cos, sin as (T, d/2, 1) tensors for the composed form.
    Composed(Tensor, Tensor),
}

impl InnerRope {
    fn new(t: usize, first: usize, mini_batch: usize, d: usize, like: &Tensor) -> Result<Self> {
        let (cos, sin) = inner_rope_angles(t, first, mini_batch, d);
        if is_cpu_f32(like) {
            let f32s = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect();
            return Ok(Self::Fused(Arc::new(Box::new(ttt_ops::PairRotation {
                cos: f32s(cos),
                sin: f32s(sin),
            }))));
        }
        let table =
            |v: Vec<f64>| Tensor::from_vec(v, (t, d / 2, 1), like.device())?.to_dtype(like.dtype());
        Ok(Self::Composed(table(cos)?, table(sin)?))
    }

    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (cos, sin) = match self {
            Self::Fused(op) => return x.contiguous()?.apply_op1_arc(op.clone()),
            Self::Composed(cos, sin) => (cos, sin),
        };
        let (b, h, t, d) = x.dims4()?;
        let pairs = x.reshape((b, h, t, d / 2, 2))?;
        let even = pairs.narrow(4, 0, 1)?;
        let odd = pairs.narrow(4, 1, 1)?;
        let re = (even.broadcast_mul(cos)? - odd.broadcast_mul(sin)?)?;
        let im = (even.broadcast_mul(sin)? + odd.broadcast_mul(cos)?)?;
        Tensor::cat(&[&re, &im], 4)?.reshape((b, h, t, d))
    }
}

impl TttLinear {
    pub fn new(cfg: &ModelConfig, std: f64, out_std: f64, vb: VarBuilder) -> Result<Self> {
        let (dim, n_heads) = (cfg.dim, cfg.n_heads);
        let d = cfg.head_dim();
        let kind = cfg.linear_kind();
        let normal = |stdev| Init::Randn { mean: 0.0, stdev };
        let mamba = if cfg.mamba() {
            Some(MambaParts {
                conv_q: CausalConv::new(dim, cfg.ttt_conv_kernel, vb.pp("conv_q"))?,
                conv_k: CausalConv::new(dim, cfg.ttt_conv_kernel, vb.pp("conv_k"))?,
                gate: BitLinear::new(dim, dim, kind, std, vb.pp("gate"))?,
            })
        } else {
            None
        };
        Ok(Self {
            q: BitLinear::new(dim, dim, kind, std, vb.pp("q"))?,
            k: match mamba {
                Some(_) => None,
                None => Some(BitLinear::new(dim, dim, kind, std, vb.pp("k"))?),
            },
            v: BitLinear::new(dim, dim, kind, std, vb.pp("v"))?,
            o: BitLinear::new(dim, dim, kind, out_std, vb.pp("o"))?,
            mamba,
            lr: vb.get_with_hints((n_heads, dim), "lr.weight", normal(std))?,
            lr_bias: match cfg.ttt_lr_bias {
                true => Some(vb.get_with_hints(n_heads, "lr.bias", Init::Const(0.0))?),
                false => None,
            },
            token_offset: match cfg.ttt_token_eta {
                TokenEta::Index => Some(vb.get_with_hints(
                    cfg.ttt_mini_batch,
                    "token_eta.offset",
                    Init::Const(0.0),
                )?),
                TokenEta::None => None,
            },
            w0: vb.get_with_hints((n_heads, d, d), "w0", normal(std))?,
            b0: vb.get_with_hints((n_heads, 1, d), "b0", Init::Const(0.0))?,
            ln_weight: vb.get_with_hints((n_heads, 1, d), "ln.weight", Init::Const(1.0))?,
            ln_bias: vb.get_with_hints((n_heads, 1, d), "ln.bias", Init::Const(0.0))?,
            post_norm: match cfg.ttt_post_norm {
                true => Some((
                    vb.get_with_hints(dim, "post_norm.weight", Init::Const(1.0))?,
                    vb.get_with_hints(dim, "post_norm.bias", Init::Const(0.0))?,
                )),
                false => None,
            },
            inner_rope: cfg.ttt_inner_rope,
            n_heads,
            head_dim: d,
            mini_batch: cfg.ttt_mini_batch,
            base_lr: cfg.ttt_base_lr,
        })
    }

    /// The state before the first token: W0, b0 of every head, for `batch` sequences.
    pub fn initial_state(&self, batch: usize) -> Result<TttState> {
        let (h, d) = (self.n_heads, self.head_dim);
        let w = self
            .w0
            .unsqueeze(0)?
            .broadcast_as((batch, h, d, d))?
            .contiguous()?;
        let b = self
            .b0
            .unsqueeze(0)?
            .broadcast_as((batch, h, 1, d))?
            .contiguous()?;
        Ok(TttState {
            w_base: w,
            b_base: b,
            acc: None,
            pos: 0,
            qk_tail: None,
            pre_tail: None,
        })
    }

    /// LN of the inner model with the learned per-head scale and shift.
    #[cfg(test)]
    fn inner_ln(&self, z: &Tensor) -> Result<Tensor> {
        LnParams::of(self).layer_norm(z)
    }

    /// τ_t for every position of a mini-batch, (b, 1): max(0, 1/(t+1) + offset_t); `None` for τ ≡ 1.
    fn token_scale(&self, like: &Tensor) -> Result<Option<Tensor>> {
        let Some(offset) = &self.token_offset else {
            return Ok(None);
        };
        let base: Vec<f64> = (0..self.mini_batch).map(|t| 1.0 / (t + 1) as f64).collect();
        let base =
            Tensor::from_vec(base, self.mini_batch, like.device())?.to_dtype(like.dtype())?;
        Ok(Some(
            (base + offset.to_dtype(like.dtype())?)?
                .relu()?
                .unsqueeze(1)?,
        ))
    }

    /// ∂ℓ/∂Z of the inner loss ℓ = ½‖LN(Z) − (v − k)‖² at Z = k W_base + b_base (the reconstruction
    /// target is v − k because f has a residual connection), through the layer norm's backward. With
    /// LN(Z) = γ ⊙ x̂ + β the loss is ½‖γ ⊙ x̂ − t‖² with t = (v − k) − β: callers pass that shifted target
    /// (made once for a whole chunk) and γ.
    fn inner_grad_z(
        &self,
        k: &Tensor,
        shifted: &Tensor,
        w_base: &Tensor,
        b_base: &Tensor,
        gamma: &Tensor,
    ) -> Result<Tensor> {
        let z = k.matmul(w_base)?.broadcast_add(b_base)?;
        if is_cpu_f32(&z) && gamma.dims() == z.dims() {
            let op = ttt_ops::InnerGradZ {
                eps: INNER_LN_EPS as f32,
            };
            return z
                .contiguous()?
                .apply_op3(&shifted.contiguous()?, &gamma.contiguous()?, op);
        }
        let (xhat, inv_std) = normalize(&z)?;
        let g = (xhat.broadcast_mul(gamma)? - shifted)?.broadcast_mul(gamma)?; // ∂ℓ/∂x̂
        let g_mean = g.mean_keepdim(D::Minus1)?;
        let gx_mean = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
        // ∂ℓ/∂Z = (g − mean(g) − x̂·mean(g ⊙ x̂)) / σ
        g.broadcast_sub(&g_mean)?
            .sub(&xhat.broadcast_mul(&gx_mean)?)?
            .broadcast_mul(&inv_std)
    }

    /// One (part of a) mini-batch in the dual form. q, k, v: (B,H,m,d); eta: (B,H,m,1); tau: (m,1) or
    /// `None` (τ ≡ 1). Returns the inner outputs Z_q (before f's residual and LN) and the accumulated
    /// updates (Σ η_s k_sᵀ ∇Z_s, Σ η_s ∇Z_s) of the mini-batch so far.
    #[allow(clippy::too_many_arguments)]
    fn dual_step(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        eta: &Tensor,
        tau: Option<&Tensor>,
        state: &TttState,
        ln: &LnParams,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let m = q.dim(2)?;
        let shifted = (v - k)?.broadcast_sub(&ln.bias)?;
        let dz = self.inner_grad_z(k, &shifted, &state.w_base, &state.b_base, &ln.weight)?;
        // Dual form (Sec. 2.5): Z_q = Q W + b − τ ⊙ (tril(Q Kᵀ + 1) ⊙ η_sᵀ) ∇Z, causal inside the mini-batch,
        // with W, b the state at the mini-batch start less what its earlier tokens already added.
        let mask = Tensor::tril2(m, q.dtype(), q.device())?;
        let mut scores = (q.matmul(&k.t()?)? + 1.0)?
            .broadcast_mul(&mask)?
            .broadcast_mul(&eta.transpose(2, 3)?)?;
        if let Some(tau) = tau {
            scores = scores.broadcast_mul(tau)?;
        }
        let mut zq = q
            .matmul(&state.w_base)?
            .broadcast_add(&state.b_base)?
            .sub(&scores.matmul(&dz)?)?;
        if let Some((acc_w, acc_b)) = &state.acc {
            let mut earlier = q.matmul(acc_w)?.broadcast_add(acc_b)?;
            if let Some(tau) = tau {
                earlier = earlier.broadcast_mul(tau)?;
            }
            zq = (zq - earlier)?;
        }
        // The mini-batch's summed update so far: Kᵀ (η ⊙ ∇Z), Σ_s η_s ∇Z_s  (eq. 6).
        let eta_dz = dz.broadcast_mul(eta)?;
        let mut acc_w = k.t()?.matmul(&eta_dz)?;
        let mut acc_b = eta_dz.sum_keepdim(2)?;
        if let Some((w, b)) = &state.acc {
            acc_w = (acc_w + w)?;
            acc_b = (acc_b + b)?;
        }
        Ok((zq, (acc_w, acc_b)))
    }

    /// Q, K, V as per-head (B,H,T,d) tensors (with the inner RoPE at mini-batch positions from `first`)
    /// and the token-dependent inner learning rate η (B,H,T,1); with the Mamba backbone also the tail of the
    /// convolutions' input after x.
    #[allow(clippy::type_complexity)]
    fn project(
        &self,
        x: &Tensor,
        first: usize,
        qk_tail: Option<Tensor>,
    ) -> Result<(Tensor, Tensor, Tensor, Tensor, Option<Tensor>)> {
        let (b, t, _) = x.dims3()?;
        let heads = |y: Tensor| -> Result<Tensor> {
            y.reshape((b, t, self.n_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, tail) = match (&self.mamba, &self.k) {
            (Some(m), _) => {
                let shared = self.q.forward(x)?;
                let (padded, tail) = m.conv_q.pad(&shared, qk_tail)?;
                let q = m.conv_q.forward_padded(&padded)?;
                let k = m.conv_k.forward_padded(&padded)?;
                (q, k, Some(tail))
            }
            (None, Some(k)) => (self.q.forward(x)?, k.forward(x)?, None),
            (None, None) => candle_core::bail!("TTT layer without θ_K or the Mamba convolutions"),
        };
        let (mut q, mut k) = (heads(q)?, heads(k)?);
        if self.inner_rope {
            let rope = InnerRope::new(t, first, self.mini_batch, self.head_dim, x)?;
            q = rope.apply(&q)?;
            k = rope.apply(&k)?;
        }
        let v = heads(self.v.forward(x)?)?;
        // η(x) = η_base · sigmoid(θ_lr x + β_lr) / d
        let mut logits = x.broadcast_matmul(&self.lr.t()?)?; // (B,T,H)
        if let Some(bias) = &self.lr_bias {
            logits = logits.broadcast_add(bias)?;
        }
        let sig = (logits.neg()?.exp()? + 1.0)?.recip()?;
        let eta = sig
            .affine(self.base_lr / self.head_dim as f64, 0.0)?
            .transpose(1, 2)?
            .unsqueeze(3)?
            .contiguous()?;
        Ok((q, k, v, eta, tail))
    }

    /// From the inner outputs y (B,T,D) to the layer's output: post-norm, the Mamba gate, θ_O.
    fn output(&self, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let mut y = y;
        if let Some((w, b)) = &self.post_norm {
            y = if is_cpu_f32(&y) && is_cpu_f32(w) {
                let op = ttt_ops::AffineLayerNorm {
                    eps: INNER_LN_EPS as f32,
                };
                y.contiguous()?
                    .apply_op3(&w.contiguous()?, &b.contiguous()?, op)?
            } else {
                normalized(&y)?.broadcast_mul(w)?.broadcast_add(b)?
            };
        }
        if let Some(m) = &self.mamba {
            // y ⊙ GELU(θ_G x), the tanh form, as the authors'.
            y = gate::<Gelu>(&m.gate.forward(x)?, &y)?;
        }
        self.o.forward(&y)
    }

    /// Mix a chunk x (B,T,D) continuing from `state` (or from W0 when `None`); returns the output and the
    /// state after the chunk. Chunks may end anywhere, also inside a mini-batch.
    pub fn forward_with_state(
        &self,
        x: &Tensor,
        state: Option<TttState>,
    ) -> Result<(Tensor, TttState)> {
        let (b, t, dim) = x.dims3()?;
        let mut state = match state {
            Some(s) => s,
            None => self.initial_state(b)?,
        };
        let (q, k, v, eta, tail) = self.project(x, state.pos, state.qk_tail.take())?;
        state.qk_tail = tail;
        let tau = self.token_scale(&q)?;
        let (y, state) = if state.pos == 0 && t > 0 && t.is_multiple_of(self.mini_batch) {
            self.scan_whole(&q, &k, &v, &eta, tau.as_ref(), state)?
        } else {
            self.scan_parts(&q, &k, &v, &eta, tau.as_ref(), state)?
        };
        let y = y.transpose(1, 2)?.reshape((b, t, dim))?;
        Ok((self.output(x, y)?, state))
    }

    /// The state after a mini-batch whose summed update is (Σ η_s k_sᵀ ∇Z_s, Σ η_s ∇Z_s):
    /// W_b = W_base − τ_b Σ_s η_s ∇ℓ_s.
    fn end_mini_batch(
        &self,
        state: &mut TttState,
        acc: (Tensor, Tensor),
        tau: Option<&Tensor>,
    ) -> Result<()> {
        let (mut acc_w, mut acc_b) = acc;
        if let Some(tau) = tau {
            let last = tau.narrow(0, self.mini_batch - 1, 1)?.squeeze(1)?;
            acc_w = acc_w.broadcast_mul(&last)?;
            acc_b = acc_b.broadcast_mul(&last)?;
        }
        state.w_base = (&state.w_base - acc_w)?;
        state.b_base = (&state.b_base - acc_b)?;
        state.acc = None;
        state.pos = 0;
        Ok(())
    }

    /// Whole mini-batches from a mini-batch start (training's case): the work that does not depend on the
    /// state — the dual form's causal, η- and τ-weighted Q Kᵀ, the targets, the output LN — is done for
    /// all of them at once, around the sequential scan. Returns f(Q) as (B,H,T,d) and the state.
    #[allow(clippy::too_many_arguments)]
    fn scan_whole(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        eta: &Tensor,
        tau: Option<&Tensor>,
        mut state: TttState,
    ) -> Result<(Tensor, TttState)> {
        if is_cpu_f32(q) {
            return self.scan_fused(q, k, v, eta, tau, state);
        }
        let (b, h, t, d) = q.dims4()?;
        let (m, n) = (self.mini_batch, t / self.mini_batch);
        // (B,H,T,w) → (N,B,H,b,w): each mini-batch one contiguous slab.
        let slabs = |x: &Tensor| -> Result<Tensor> {
            let w = x.dim(3)?;
            x.reshape((b, h, n, m, w))?
                .permute((2, 0, 1, 3, 4))?
                .contiguous()
        };
        let (qn, kn, vn, en) = (slabs(q)?, slabs(k)?, slabs(v)?, slabs(eta)?);
        // Dual form (Sec. 2.5): Z_q = Q W + b − τ ⊙ (tril(Q Kᵀ + 1) ⊙ η_sᵀ) ∇Z, for every mini-batch.
        let mask = Tensor::tril2(m, q.dtype(), q.device())?;
        // (candle's matmul takes at most two batch dims: N and B go together.)
        let flat = |x: &Tensor| x.reshape((n * b, h, m, d));
        let qk = flat(&qn)?
            .matmul(&flat(&kn)?.t()?)?
            .reshape((n, b, h, m, m))?;
        let mut scores = (qk + 1.0)?
            .broadcast_mul(&mask)?
            .broadcast_mul(&en.transpose(3, 4)?)?;
        if let Some(tau) = tau {
            scores = scores.broadcast_mul(tau)?;
        }
        // The inner loss's targets less the LN shift, (v − k) − β (see `inner_grad_z`).
        let targets = (&vn - &kn)?.broadcast_sub(&self.ln_bias)?;
        // γ broadcast once for all mini-batches (its gradient is then summed over the batch once).
        let gamma = self.ln_weight.broadcast_as((b, h, m, d))?.contiguous()?;
        let mut zs = Vec::with_capacity(n);
        for i in 0..n {
            let (ki, ei) = (kn.get(i)?, en.get(i)?);
            let dz =
                self.inner_grad_z(&ki, &targets.get(i)?, &state.w_base, &state.b_base, &gamma)?;
            zs.push(
                qn.get(i)?
                    .matmul(&state.w_base)?
                    .broadcast_add(&state.b_base)?
                    .sub(&scores.get(i)?.matmul(&dz)?)?,
            );
            // W ← W − τ_b Kᵀ (η ⊙ ∇Z), b ← b − τ_b Σ_s η_s ∇Z_s  (eq. 6 summed over the mini-batch).
            let eta_dz = dz.broadcast_mul(&ei)?;
            let acc = (ki.t()?.matmul(&eta_dz)?, eta_dz.sum_keepdim(2)?);
            self.end_mini_batch(&mut state, acc, tau)?;
        }
        // f(q) = q + LN(Z_q), eq. 5, for all mini-batches at once; back to (B,H,T,d).
        let out = (&qn + LnParams::of(self).layer_norm(&Tensor::stack(&zs, 0)?)?)?;
        let out = out.permute((1, 2, 0, 3, 4))?.reshape((b, h, t, d))?;
        Ok((out, state))
    }

    /// [`Self::scan_whole`] on the CPU in f32: the whole dual form, from Q, K, V, η, τ and the state to f(Q)
    /// and the state after the chunk, is one fused op ([`DualScan`]).
    #[allow(clippy::too_many_arguments)]
    fn scan_fused(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        eta: &Tensor,
        tau: Option<&Tensor>,
        mut state: TttState,
    ) -> Result<(Tensor, TttState)> {
        let (b, h, t, d) = q.dims4()?;
        let (m, n) = (self.mini_batch, t / self.mini_batch);
        // τ_t at every token, (B,H,T,1).
        let tau = match tau {
            Some(tau) => tau.unsqueeze(0)?.broadcast_as((n, m, 1))?.reshape((t, 1))?,
            None => Tensor::ones((t, 1), q.dtype(), q.device())?,
        };
        let mixing = Tensor::cat(&[eta, &tau.broadcast_as((b, h, t, 1))?], 3)?;
        let per_head = |p: &Tensor| p.unsqueeze(0)?.broadcast_as((b, h, 1, d));
        let (gamma, beta) = (per_head(&self.ln_weight)?, per_head(&self.ln_bias)?);
        let (y, after) = DualScan::apply(
            &Tensor::cat(&[q, k, v], 3)?.contiguous()?,
            &mixing.contiguous()?,
            &Tensor::cat(&[&state.w_base, &state.b_base, &gamma, &beta], 2)?.contiguous()?,
            m,
            INNER_LN_EPS as f32,
        )?;
        state.w_base = after.narrow(2, 0, d)?.contiguous()?;
        state.b_base = after.narrow(2, d, 1)?.contiguous()?;
        Ok((y, state))
    }

    /// Any chunk, continuing `state` anywhere inside a mini-batch (chunked prompts, decoding): mini-batch
    /// by mini-batch. Returns f(Q) as (B,H,T,d) and the state.
    #[allow(clippy::too_many_arguments)]
    fn scan_parts(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        eta: &Tensor,
        tau: Option<&Tensor>,
        mut state: TttState,
    ) -> Result<(Tensor, TttState)> {
        let (b, _, t, _) = q.dims4()?;
        let mut outs = Vec::with_capacity(t.div_ceil(self.mini_batch) + 1);
        // Over whole mini-batches the LN parameters are broadcast once for all of them: the backward then
        // sums their gradient over the batch once per chunk instead of once per use in every mini-batch.
        let per_head = LnParams::of(self);
        let full = if t >= self.mini_batch {
            Some(per_head.broadcast((b, self.n_heads, self.mini_batch, self.head_dim))?)
        } else {
            None
        };
        let mut start = 0;
        while start < t {
            let len = (self.mini_batch - state.pos).min(t - start);
            let part = |x: &Tensor| x.narrow(2, start, len);
            let (qs, ks, vs, es) = (part(q)?, part(k)?, part(v)?, part(eta)?);
            let ln = match &full {
                Some(full) if len == self.mini_batch => full,
                _ => &per_head,
            };
            let tau_part = tau.map(|t| t.narrow(0, state.pos, len)).transpose()?;
            let (zq, acc) = self.dual_step(&qs, &ks, &vs, &es, tau_part.as_ref(), &state, ln)?;
            outs.push((&qs + ln.layer_norm(&zq)?)?); // f(q) = q + LN(Z_q), eq. 5
            state.pos += len;
            if state.pos == self.mini_batch {
                self.end_mini_batch(&mut state, acc, tau)?;
            } else {
                state.acc = Some(acc);
            }
            start += len;
        }
        Ok((Tensor::cat(&outs, 2)?, state))
    }

    /// Reference implementation for tests: the primal form, token by token, with the inner gradient taken
    /// by autograd instead of the closed-form LN backward.
    #[cfg(test)]
    pub(crate) fn forward_primal(&self, x: &Tensor) -> Result<Tensor> {
        use candle_core::Var;
        let (bsz, t, dim) = x.dims3()?;
        let (q, k, v, eta, _) = self.project(x, 0, None)?;
        let tau = self.token_scale(&q)?;
        let init = self.initial_state(bsz)?;
        let (mut w_base, mut b_base) = (init.w_base.detach(), init.b_base.detach());
        let (mut acc_w, mut acc_b) = (w_base.zeros_like()?, b_base.zeros_like()?);
        let mut outs = Vec::new();
        for i in 0..t {
            let p = i % self.mini_batch;
            let tau_p = match &tau {
                Some(tau) => tau.narrow(0, p, 1)?.squeeze(1)?.detach(),
                None => Tensor::ones(1, q.dtype(), q.device())?,
            };
            let tok = |x: &Tensor| x.narrow(2, i, 1).map(|x| x.detach());
            let (qi, ki, vi, ei) = (tok(&q)?, tok(&k)?, tok(&v)?, tok(&eta)?);
            // ∇_W, ∇_b of ½‖f(k) − v‖² at the mini-batch's starting W (autograd).
            let wv = Var::from_tensor(&w_base)?;
            let bv = Var::from_tensor(&b_base)?;
            let f_k = (&ki
                + self.inner_ln(&ki.matmul(wv.as_tensor())?.broadcast_add(bv.as_tensor())?)?)?;
            let loss = ((f_k - &vi)?.sqr()?.sum_all()? * 0.5)?;
            let grads = loss.backward()?;
            let gw = grads.get(wv.as_tensor()).expect("grad W").clone();
            let gb = grads.get(bv.as_tensor()).expect("grad b").clone();
            acc_w = (acc_w + gw.broadcast_mul(&ei)?)?;
            acc_b = (acc_b + gb.broadcast_mul(&ei)?)?;
            let w = (&w_base - acc_w.broadcast_mul(&tau_p)?)?;
            let b = (&b_base - acc_b.broadcast_mul(&tau_p)?)?;
            let zq = qi.matmul(&w)?.broadcast_add(&b)?;
            outs.push((&qi + self.inner_ln(&zq)?)?);
            if p == self.mini_batch - 1 {
                (w_base, b_base) = (w, b);
                acc_w = acc_w.zeros_like()?;
                acc_b = acc_b.zeros_like()?;
            }
        }
        let y = Tensor::cat(&outs, 2)?
            .transpose(1, 2)?
            .reshape((bsz, t, dim))?;
        self.output(x, y)
    }
}

impl Module for TttLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_state(x, None)?.0)
    }
}

/// Cast helper for tests comparing tensors.
#[cfg(test)]
pub(crate) fn max_rel_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    use candle_core::DType;
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let scale = a.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-12);
    Ok(diff / scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::WeightKind;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn layer_with(cfg: &ModelConfig, dtype: DType) -> Result<(VarMap, TttLinear)> {
        let varmap = VarMap::new();
        let vb = crate::model::init::seeded_var_builder(&varmap, 7, dtype, &Device::Cpu);
        // A large std so that the inner loop actually moves W and the test is sensitive.
        let l = TttLinear::new(cfg, 0.2, 0.2, vb.pp("ttt"))?;
        // Non-zero token-η offsets, θ_lr bias and post-norm parameters, so that each one is exercised.
        crate::model::init::perturb_constant_inits(&varmap)?;
        Ok((varmap, l))
    }

    fn layer(dtype: DType, mini_batch: usize, kind: WeightKind) -> Result<(VarMap, TttLinear)> {
        let cfg = ModelConfig {
            dim: 32,
            n_heads: 4,
            ttt_mini_batch: mini_batch,
            weights: kind,
            ..Default::default()
        };
        layer_with(&cfg, dtype)
    }

    /// Every variant of the layer: legacy, the authors' defaults, Mamba.
    fn variants(mini_batch: usize, kind: WeightKind) -> Vec<ModelConfig> {
        let base = ModelConfig {
            dim: 32,
            n_heads: 4,
            ttt_mini_batch: mini_batch,
            weights: kind,
            ..Default::default()
        };
        vec![
            base.clone().legacy(),
            base.clone(),
            ModelConfig {
                ttt_backbone: crate::model::config::Backbone::Mamba,
                ..base
            },
        ]
    }

    /// `f` on `inputs` in f32 (where the fused CPU ops run) and in f64 (the composed ops), through the loss
    /// Σ f(…) ⊙ `up`: the max relative difference of the value and of each input's gradient.
    fn fused_vs_composed(
        inputs: &[&Tensor],
        up: &Tensor,
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Vec<f64>> {
        use candle_core::Var;
        let mut got = Vec::new();
        for dtype in [DType::F32, DType::F64] {
            let vars = inputs
                .iter()
                .map(|t| Var::from_tensor(&t.to_dtype(dtype)?))
                .collect::<Result<Vec<_>>>()?;
            let args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&args)?;
            let grads = (&y * up.to_dtype(dtype)?)?.sum_all()?.backward()?;
            let mut out = vec![y.to_dtype(DType::F64)?];
            for v in &vars {
                let g = grads.get(v.as_tensor()).expect("gradient");
                out.push(g.to_dtype(DType::F64)?);
            }
            got.push(out);
        }
        got[0]
            .iter()
            .zip(&got[1])
            .map(|(a, b)| max_rel_diff(a, b))
            .collect()
    }

    /// The fused f32 ops (inner RoPE, normalisation) against the composed ones (taken in f64): values and
    /// gradients.
    #[test]
    fn fused_ops_match_the_composed_ones() -> Result<()> {
        let dev = Device::Cpu;
        let x = crate::model::init::seeded_randn(31, 0.0, 1.0, (2, 3, 10, 8), DType::F64, &dev)?;
        let up = crate::model::init::seeded_randn(32, 0.0, 1.0, (2, 3, 10, 8), DType::F64, &dev)?;
        type Op = fn(&Tensor) -> Result<Tensor>;
        let ops: [(&str, Op); 2] = [
            ("inner rope", |x| InnerRope::new(10, 3, 4, 8, x)?.apply(x)),
            ("normalize", normalized),
        ];
        for (name, op) in ops {
            let r = fused_vs_composed(&[&x], &up, |a| op(&a[0]))?;
            assert!(
                r[0] < 1e-5 && r[1] < 1e-5,
                "{name}: value {:e}, gradient {:e}",
                r[0],
                r[1]
            );
        }
        Ok(())
    }

    /// The fused inner gradient (f32) against the composed one (f64): value and the gradients to Z, the
    /// target, γ and β (its backward is the inner loss's second derivative, written by hand).
    #[test]
    fn fused_inner_gradient_matches_the_composed_one() -> Result<()> {
        let dev = Device::Cpu;
        let (_vm, l) = layer(DType::F64, 4, WeightKind::Float)?;
        let draw = |seed, mean, std, shape: (usize, usize, usize, usize)| {
            crate::model::init::seeded_randn(seed, mean, std, shape, DType::F64, &dev)
        };
        let shape = (2, 4, 4, 8);
        let (k, target, gamma, beta) = (
            draw(41, 0.0, 1.0, shape)?,
            draw(42, 0.0, 1.0, shape)?,
            draw(43, 1.0, 0.3, shape)?,
            draw(44, 0.0, 0.3, shape)?,
        );
        let (up, w, b) = (
            draw(45, 0.0, 1.0, shape)?,
            draw(46, 0.0, 0.5, (2, 4, 8, 8))?,
            draw(47, 0.0, 0.5, (2, 4, 1, 8))?,
        );
        let r = fused_vs_composed(&[&k, &target, &gamma, &beta, &w], &up, |a| {
            let shifted = (&a[1] - &a[3])?; // target − β
            l.inner_grad_z(&a[0], &shifted, &a[4], &b.to_dtype(a[0].dtype())?, &a[2])
        })?;
        for (name, r) in ["value", "∂k", "∂target", "∂γ", "∂β", "∂W"].iter().zip(r) {
            assert!(r < 1e-4, "{name}: fused vs composed rel diff {r:e}");
        }
        Ok(())
    }

    /// The fused Mamba gate y ⊙ GELU(g) (f32) against candle's (f64): value and gradients to y and g.
    #[test]
    fn fused_gate_matches_the_composed_one() -> Result<()> {
        let dev = Device::Cpu;
        let draw = |seed, std| {
            crate::model::init::seeded_randn(seed, 0.0, std, (3, 70, 16), DType::F64, &dev)
        };
        let (y, g, up) = (draw(55, 1.0)?, draw(56, 2.5)?, draw(57, 1.0)?);
        let r = fused_vs_composed(&[&y, &g], &up, |a| match a[0].dtype() {
            DType::F32 => gate::<Gelu>(&a[1], &a[0]),
            _ => &a[0] * a[1].gelu()?,
        })?;
        for (name, r) in ["value", "∂y", "∂g"].iter().zip(r) {
            assert!(r < 1e-5, "{name}: fused vs composed rel diff {r:e}");
        }
        Ok(())
    }

    /// The fused post-norm (f32) against the composed one (f64): value and gradients to x, scale, shift.
    #[test]
    fn fused_post_norm_matches_the_composed_one() -> Result<()> {
        let dev = Device::Cpu;
        let x = crate::model::init::seeded_randn(51, 0.5, 2.0, (3, 70, 16), DType::F64, &dev)?;
        let w = crate::model::init::seeded_randn(52, 1.0, 0.3, 16, DType::F64, &dev)?;
        let b = crate::model::init::seeded_randn(53, 0.0, 0.3, 16, DType::F64, &dev)?;
        let up = crate::model::init::seeded_randn(54, 0.0, 1.0, (3, 70, 16), DType::F64, &dev)?;
        let r = fused_vs_composed(&[&x, &w, &b], &up, |a| {
            let (x, w, b) = (&a[0], &a[1], &a[2]);
            if x.dtype() == DType::F32 {
                let op = ttt_ops::AffineLayerNorm {
                    eps: INNER_LN_EPS as f32,
                };
                x.apply_op3(w, b, op)
            } else {
                normalized(x)?.broadcast_mul(w)?.broadcast_add(b)
            }
        })?;
        for (name, r) in ["value", "∂x", "∂w", "∂b"].iter().zip(r) {
            assert!(r < 1e-5, "{name}: fused vs composed rel diff {r:e}");
        }
        Ok(())
    }

    /// The fused scan (f32, [`DualScan`]) against the composed one (f64) through a whole layer, for every
    /// variant: outputs of two chunks (the second starting from the first's state) and the state after them,
    /// and the gradients of a loss on all three to the input and to every parameter.
    #[test]
    fn fused_scan_matches_the_composed_one() -> Result<()> {
        use candle_core::Var;
        let dev = Device::Cpu;
        for cfg in variants(4, WeightKind::Float) {
            let mut got: Vec<Vec<(String, Tensor)>> = Vec::new();
            for dtype in [DType::F32, DType::F64] {
                let (vm, l) = layer_with(&cfg, dtype)?;
                // The inner LN's scale and shift away from 1 and 0.
                for (name, var) in vm.data().lock().expect("varmap").iter() {
                    if name.contains("ttt.ln.") {
                        let noise = crate::model::init::seeded_randn(
                            5,
                            0.0,
                            0.3,
                            var.shape(),
                            dtype,
                            &dev,
                        )?;
                        var.set(&(var.as_tensor() + noise)?)?;
                    }
                }
                let draw = |seed, shape: (usize, usize, usize)| {
                    crate::model::init::seeded_randn(seed, 0.0, 1.0, shape, dtype, &dev)
                };
                let x = Var::from_tensor(&draw(61, (2, 12, 32))?)?;
                let (y1, s) = l.forward_with_state(&x.narrow(1, 0, 8)?, None)?;
                let (y2, s) = l.forward_with_state(&x.narrow(1, 8, 4)?, Some(s))?;
                let loss = (&y1 * draw(62, (2, 8, 32))?)?.sum_all()?;
                let loss = (loss + (&y2 * draw(63, (2, 4, 32))?)?.sum_all()?)?;
                let w_up = draw(64, (8, 8, 8))?.reshape(s.w_base.shape())?;
                let loss = (loss + (&s.w_base * w_up)?.sum_all()? + s.b_base.sum_all()?)?;
                let grads = loss.backward()?;
                let mut out = vec![
                    ("y".to_string(), Tensor::cat(&[&y1, &y2], 1)?),
                    ("W".to_string(), s.w_base.clone()),
                    (
                        "∂x".to_string(),
                        grads.get(x.as_tensor()).expect("∂x").clone(),
                    ),
                ];
                let data = vm.data().lock().expect("varmap");
                let mut names: Vec<_> = data.keys().cloned().collect();
                names.sort();
                for name in names {
                    let g = grads.get(data[&name].as_tensor()).expect("gradient");
                    out.push((format!("∂{name}"), g.clone()));
                }
                got.push(out);
            }
            for ((name, a), (_, b)) in got[0].iter().zip(&got[1]) {
                let r = max_rel_diff(a, b)?;
                assert!(
                    r < 1e-4,
                    "{:?} {name}: fused vs composed rel diff {r:e}",
                    cfg.ttt_backbone
                );
            }
        }
        Ok(())
    }

    #[test]
    fn dual_form_equals_primal_for_ragged_lengths() -> Result<()> {
        for cfg in variants(4, WeightKind::Float) {
            let (_vm, l) = layer_with(&cfg, DType::F64)?;
            ragged_lengths(&l)?;
        }
        Ok(())
    }

    fn ragged_lengths(l: &TttLinear) -> Result<()> {
        for t in [1usize, 3, 5, 9, 14] {
            let x = crate::model::init::seeded_randn(
                102,
                0.0,
                1.0,
                (2, t, 32),
                DType::F64,
                &Device::Cpu,
            )?;
            let dual = l.forward(&x)?;
            let primal = l.forward_primal(&x)?;
            let rel = max_rel_diff(&dual, &primal)?;
            assert!(rel < 1e-4, "T={t}: dual vs primal rel diff {rel}");
        }
        Ok(())
    }

    #[test]
    fn dual_form_equals_primal_in_f32_ternary() -> Result<()> {
        let (_vm, l) = layer(DType::F32, 16, WeightKind::Ternary)?;
        let x =
            crate::model::init::seeded_randn(103, 0.0, 1.0, (2, 37, 32), DType::F32, &Device::Cpu)?;
        let rel = max_rel_diff(&l.forward(&x)?, &l.forward_primal(&x)?)?;
        assert!(rel < 1e-4, "rel diff {rel}");
        Ok(())
    }

    #[test]
    fn two_chunks_with_carried_state_equal_one_call() -> Result<()> {
        for cfg in variants(4, WeightKind::Float) {
            let (_vm, l) = layer_with(&cfg, DType::F64)?;
            chunks_equal_one_call(&l)?;
        }
        Ok(())
    }

    fn chunks_equal_one_call(l: &TttLinear) -> Result<()> {
        let x =
            crate::model::init::seeded_randn(104, 0.0, 1.0, (2, 19, 32), DType::F64, &Device::Cpu)?;
        let whole = l.forward(&x)?;
        for split in [1usize, 4, 6, 11] {
            let (a, s) = l.forward_with_state(&x.narrow(1, 0, split)?, None)?;
            let (b, _) = l.forward_with_state(&x.narrow(1, split, 19 - split)?, Some(s))?;
            let chunked = Tensor::cat(&[a, b], 1)?;
            let rel = max_rel_diff(&whole, &chunked)?;
            assert!(rel < 1e-10, "split at {split}: rel diff {rel}");
        }
        // Token by token (the decoder's path).
        let mut state = None;
        let mut outs = Vec::new();
        for i in 0..19 {
            let (y, s) = l.forward_with_state(&x.narrow(1, i, 1)?, state)?;
            outs.push(y);
            state = Some(s);
        }
        let rel = max_rel_diff(&whole, &Tensor::cat(&outs, 1)?)?;
        assert!(rel < 1e-10, "token by token: rel diff {rel}");
        Ok(())
    }
}
