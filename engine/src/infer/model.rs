//! `InferenceModel`: Bit-Llama for generation on the CPU, batch 1, no autograd.
//!
//! The same function as [`crate::model::BitLlama`] (eval), computed recurrently: block linears through the
//! packed ternary kernels ([`super::packed`]) or dense f32 ([`super::float`]); everything else in plain f32
//! loops. The TTT mixer steps its carried hidden state one token at a time (O(1) memory per token, the
//! primal form of Sun et al. 2024 with gradients taken at the mini-batch's starting state — equal to the dual
//! form training uses); the attention mixer keeps a KV cache. A prompt runs through the linears as one small
//! matrix product, and gives bit-identical results to feeding it token by token.

use anyhow::{bail, Result};

use super::float::FloatMatrix;
use super::tables::{Int6Rows, Int8Matrix};
use super::weights::{Linear, ModelWeights};
use crate::model::{MixerKind, ModelConfig, TokenEta};

/// ε of the TTT inner layer norm and post-norm, and RoPE's bases: training's own constants.
const INNER_LN_EPS: f32 = crate::model::ttt_linear::INNER_LN_EPS as f32;
use crate::model::attention::ROPE_THETA;
use crate::model::gate::gelu;

/// A depthwise causal convolution (the Mamba backbone): kernel D × k (oldest tap first), bias D.
struct Conv {
    weight: Vec<f32>,
    bias: Vec<f32>,
    kernel: usize,
}

impl Conv {
    /// y_n = b + Σ_j w_j ⊙ x_{n−(k−1)+j} for the t rows of `padded` = tail (k−1 rows) ++ x (t rows).
    #[inline(always)]
    fn forward(&self, padded: &[f32], t: usize) -> Vec<f32> {
        let dim = self.bias.len();
        let mut y = Vec::with_capacity(t * dim);
        for n in 0..t {
            for c in 0..dim {
                let mut v = self.bias[c];
                for j in 0..self.kernel {
                    v += padded[(n + j) * dim + c] * self.weight[c * self.kernel + j];
                }
                y.push(v);
            }
        }
        y
    }
}

/// `tail` ++ x, and replace `tail` with the last k−1 rows of it.
fn pad_with_tail(tail: &mut [f32], x: &[f32]) -> Vec<f32> {
    let mut padded = Vec::with_capacity(tail.len() + x.len());
    padded.extend_from_slice(tail);
    padded.extend_from_slice(x);
    let keep = tail.len();
    tail.copy_from_slice(&padded[padded.len() - keep..]);
    padded
}

struct Ttt {
    /// Q, K, V stacked; with the Mamba backbone the shared Q/K projection, V and the gate's θ_G.
    qkv: Linear,
    o: Linear,
    /// θ_lr (H × D) and its bias (H; zeros without one).
    lr: Vec<f32>,
    lr_bias: Vec<f32>,
    /// τ_t of every mini-batch position (ones with `ttt_token_eta = "none"`).
    tau: Vec<f32>,
    /// W0 (H × d × d), b0, inner LN γ, β (H × d).
    w0: Vec<f32>,
    b0: Vec<f32>,
    ln_w: Vec<f32>,
    ln_b: Vec<f32>,
    /// LayerNorm(D) before θ_O.
    post_norm: Option<(Vec<f32>, Vec<f32>)>,
    /// Inner RoPE cos, sin per mini-batch position (b × d/2).
    rope: Option<(Vec<f32>, Vec<f32>)>,
    /// Mamba backbone: Q and K convolutions over the shared projection.
    conv_qk: Option<(Conv, Conv)>,
}

struct Attn {
    qkv: Linear,
    o: Linear,
}

enum Mixer {
    Ttt(Box<Ttt>),
    Attention(Attn),
}

struct Layer {
    /// Mamba backbone: RMSNorm γ and the convolution of the sub-block before the mixer.
    pre_conv: Option<(Vec<f32>, Conv)>,
    norm1: Vec<f32>,
    mixer: Mixer,
    norm2: Vec<f32>,
    /// gate and up stacked (2·hidden × D).
    gate_up: Linear,
    down: Linear,
}

/// Per-layer decoding state.
#[derive(Debug, Clone)]
enum LayerState {
    /// TTT hidden state of every head: W, b at the mini-batch start and the mini-batch's summed update so far
    /// (H × d × d, H × d); the convolutions' last inputs ((k−1) × D each, empty without the Mamba backbone).
    Ttt {
        w_base: Vec<f32>,
        b_base: Vec<f32>,
        acc_w: Vec<f32>,
        acc_b: Vec<f32>,
        /// Tokens of the current mini-batch seen.
        pos: usize,
        qk_tail: Vec<f32>,
        pre_tail: Vec<f32>,
    },
    /// Keys (after RoPE) and values of every position so far, positions × D each.
    Kv { k: Vec<f32>, v: Vec<f32> },
}

/// Where a sequence stands: position and every layer's state.
#[derive(Debug, Clone)]
pub struct InferState {
    pos: usize,
    layers: Vec<LayerState>,
}

impl InferState {
    /// Tokens processed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Floats held by the state (TTT: constant; attention: grows with the sequence).
    pub fn floats(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                LayerState::Ttt {
                    w_base,
                    b_base,
                    acc_w,
                    acc_b,
                    qk_tail,
                    pre_tail,
                    ..
                } => {
                    w_base.len()
                        + b_base.len()
                        + acc_w.len()
                        + acc_b.len()
                        + qk_tail.len()
                        + pre_tail.len()
                }
                LayerState::Kv { k, v } => k.len() + v.len(),
            })
            .sum()
    }
}

/// The embedding or output head: f32, or quantized ([`InferenceModel::with_int8_tables`]).
enum TokenTable {
    F32(FloatMatrix),
    Int8(Int8Matrix),
    /// Input embedding only (no products).
    Int6(Int6Rows),
}

impl TokenTable {
    fn push_row(&self, r: usize, out: &mut Vec<f32>) {
        match self {
            TokenTable::F32(m) => out.extend_from_slice(m.row(r)),
            TokenTable::Int8(m) => m.push_row(r, out),
            TokenTable::Int6(m) => m.push_row(r, out),
        }
    }

    fn forward(&self, x: &[f32], t: usize, out: &mut [f32]) {
        match self {
            TokenTable::F32(m) => m.forward(x, t, out),
            TokenTable::Int8(m) => m.forward(x, t, out),
            TokenTable::Int6(_) => unreachable!("an int6 table is only ever the untied embedding"),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            TokenTable::F32(m) => m.bytes(),
            TokenTable::Int8(m) => m.bytes(),
            TokenTable::Int6(m) => m.bytes(),
        }
    }

    fn into_int8(self) -> TokenTable {
        match self {
            TokenTable::F32(m) => {
                TokenTable::Int8(Int8Matrix::quantize(m.data(), m.rows(), m.cols()))
            }
            other => other,
        }
    }

    fn into_int6(self) -> TokenTable {
        match self {
            TokenTable::F32(m) => {
                TokenTable::Int6(Int6Rows::quantize(m.data(), m.rows(), m.cols()))
            }
            other => other,
        }
    }
}

/// The inference model (see the module docs).
pub struct InferenceModel {
    cfg: ModelConfig,
    embed: TokenTable,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    /// `None`: tied to the embedding.
    head: Option<TokenTable>,
    weight_bytes: usize,
    linear_bytes: usize,
    /// Attention layers attend to at most this many most recent tokens (the trained context): generation
    /// past it stays in the range of relative positions the model was trained on, in bounded memory.
    window: Option<usize>,
}

/// Σ a·b with 8 interleaved partial sums (vectorisable, fixed order), then the tail.
#[inline(always)]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Σ a, as [`dot8`].
#[inline(always)]
fn sum8(a: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let ra = ca.remainder();
    for x in ca {
        for l in 0..8 {
            acc[l] += x[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for x in ra {
        s += x;
    }
    s
}

/// y = x / sqrt(mean(x²) + ε) · g per row of `dim`.
#[inline(always)]
fn rms_norm(x: &[f32], g: &[f32], eps: f32) -> Vec<f32> {
    let dim = g.len();
    let inv_n = (1.0 / dim as f64) as f32;
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(dim) {
        let ms = dot8(row, row) * inv_n;
        let inv = 1.0 / (ms + eps).sqrt();
        out.extend(row.iter().zip(g).map(|(v, w)| v * inv * w));
    }
    out
}

/// Layer-norm pieces of z: (x̂, 1/σ).
#[inline(always)]
fn normalize(z: &[f32], xhat: &mut [f32]) -> f32 {
    let inv_n = (1.0 / z.len() as f64) as f32;
    let mu = sum8(z) * inv_n;
    for (o, v) in xhat.iter_mut().zip(z) {
        *o = v - mu;
    }
    let var = dot8(xhat, xhat) * inv_n;
    let inv_std = 1.0 / (var + INNER_LN_EPS).sqrt();
    for o in xhat.iter_mut() {
        *o *= inv_std;
    }
    inv_std
}

/// z (1 × d) = x (1 × d) · W (d × d) + b.
#[inline(always)]
fn vec_mat(x: &[f32], w: &[f32], b: &[f32], z: &mut [f32]) {
    let d = b.len();
    z.copy_from_slice(b);
    for (xi, row) in x.iter().zip(w.chunks_exact(d)) {
        for (zj, wij) in z.iter_mut().zip(row) {
            *zj += xi * wij;
        }
    }
}

/// The per-head state a token step reads and updates.
struct HeadState<'a> {
    w_base: &'a mut [f32],
    b_base: &'a mut [f32],
    acc_w: &'a mut [f32],
    acc_b: &'a mut [f32],
}

impl Ttt {
    /// One token of one head at mini-batch position p: the inner gradient step on (k, v) at the
    /// mini-batch's starting state is added to the mini-batch's update, then the output
    /// f(q) = q + LN(q W_p + b_p) with W_p = W_base − τ_p Σ η_s ∇ℓ_s (Sun et al. 2024, eq. 3–7).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn head_step(
        &self,
        h: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        eta: f32,
        p: usize,
        st: HeadState,
        out: &mut [f32],
    ) {
        let d = q.len();
        let lnw = &self.ln_w[h * d..(h + 1) * d];
        let lnb = &self.ln_b[h * d..(h + 1) * d];
        let mut z = vec![0f32; d];
        let mut xhat = vec![0f32; d];
        // ∂ℓ/∂Z of ℓ = ½‖LN(k W_base + b_base) − (v − k)‖², through the layer norm's backward.
        vec_mat(k, st.w_base, st.b_base, &mut z);
        let inv_std = normalize(&z, &mut xhat);
        let inv_n = (1.0 / d as f64) as f32;
        let g: Vec<f32> = (0..d)
            .map(|j| (xhat[j] * lnw[j] + lnb[j] - (v[j] - k[j])) * lnw[j])
            .collect();
        let g_mean = sum8(&g) * inv_n;
        let gx_mean = dot8(&g, &xhat) * inv_n;
        // η ⊙ ∇Z; acc_W += kᵀ (η ∇Z), acc_b += η ∇Z.
        let edz: Vec<f32> = (0..d)
            .map(|j| (g[j] - g_mean - xhat[j] * gx_mean) * inv_std * eta)
            .collect();
        for (ki, row) in k.iter().zip(st.acc_w.chunks_exact_mut(d)) {
            for (a, e) in row.iter_mut().zip(&edz) {
                *a += ki * e;
            }
        }
        for (a, e) in st.acc_b.iter_mut().zip(&edz) {
            *a += e;
        }
        // Z = q W_base + b_base − τ_p (q acc_W + acc_b).
        let tau = self.tau[p];
        let mut upd = vec![0f32; d];
        vec_mat(q, st.acc_w, st.acc_b, &mut upd);
        vec_mat(q, st.w_base, st.b_base, &mut z);
        for (zj, u) in z.iter_mut().zip(&upd) {
            *zj -= tau * u;
        }
        normalize(&z, &mut xhat);
        for j in 0..d {
            out[j] = q[j] + (xhat[j] * lnw[j] + lnb[j]);
        }
        if p + 1 == self.tau.len() {
            // The next mini-batch starts from W_b = W_base − τ_b acc_W.
            for (w, a) in st.w_base.iter_mut().zip(st.acc_w.iter_mut()) {
                *w -= tau * *a;
                *a = 0.0;
            }
            for (b, a) in st.b_base.iter_mut().zip(st.acc_b.iter_mut()) {
                *b -= tau * *a;
                *a = 0.0;
            }
        }
    }

    /// The mixer over `t` normed tokens x (t × D), continuing `state`.
    #[inline(always)]
    fn forward(&self, cfg: &ModelConfig, x: &[f32], t: usize, state: &mut LayerState) -> Vec<f32> {
        let (dim, nh, d) = (cfg.dim, cfg.n_heads, cfg.head_dim());
        let LayerState::Ttt {
            w_base,
            b_base,
            acc_w,
            acc_b,
            pos,
            qk_tail,
            ..
        } = state
        else {
            unreachable!("TTT layer with a KV state")
        };
        let proj = self.qkv.forward(x, t);
        // Rows of (Q, K, V) and, with the Mamba backbone, the gate's pre-activation.
        let (qkv, gate) = match &self.conv_qk {
            None => (proj, None),
            Some((conv_q, conv_k)) => {
                let shared: Vec<f32> = proj
                    .chunks_exact(3 * dim)
                    .flat_map(|r| &r[..dim])
                    .copied()
                    .collect();
                let padded = pad_with_tail(qk_tail, &shared);
                let (q, k) = (conv_q.forward(&padded, t), conv_k.forward(&padded, t));
                let mut qkv = Vec::with_capacity(3 * t * dim);
                let mut gate = Vec::with_capacity(t * dim);
                for n in 0..t {
                    let row = &proj[n * 3 * dim..(n + 1) * 3 * dim];
                    qkv.extend_from_slice(&q[n * dim..(n + 1) * dim]);
                    qkv.extend_from_slice(&k[n * dim..(n + 1) * dim]);
                    qkv.extend_from_slice(&row[dim..2 * dim]);
                    gate.extend_from_slice(&row[2 * dim..]);
                }
                (qkv, Some(gate))
            }
        };
        let eta_scale = (cfg.ttt_base_lr / d as f64) as f32;
        let mut y = vec![0f32; t * dim];
        for n in 0..t {
            let xn = &x[n * dim..(n + 1) * dim];
            let row = &qkv[n * 3 * dim..(n + 1) * 3 * dim];
            let (mut q, mut k) = (row[..dim].to_vec(), row[dim..2 * dim].to_vec());
            if let Some((cos, sin)) = &self.rope {
                let half = d / 2;
                let (c, s) = (
                    &cos[*pos * half..(*pos + 1) * half],
                    &sin[*pos * half..(*pos + 1) * half],
                );
                for h in 0..nh {
                    rope_pairs(&mut q[h * d..(h + 1) * d], c, s);
                    rope_pairs(&mut k[h * d..(h + 1) * d], c, s);
                }
            }
            for h in 0..nh {
                // η = η_base · sigmoid(θ_lr x + β_lr) / d
                let logit = dot8(&self.lr[h * dim..(h + 1) * dim], xn) + self.lr_bias[h];
                let eta = (1.0 / ((-logit).exp() + 1.0)) * eta_scale;
                let s = h * d;
                let (hw, hb) = (h * d * d..(h + 1) * d * d, h * d..(h + 1) * d);
                self.head_step(
                    h,
                    &q[s..s + d],
                    &k[s..s + d],
                    &row[2 * dim + s..2 * dim + s + d],
                    eta,
                    *pos,
                    HeadState {
                        w_base: &mut w_base[hw.clone()],
                        b_base: &mut b_base[hb.clone()],
                        acc_w: &mut acc_w[hw],
                        acc_b: &mut acc_b[hb],
                    },
                    &mut y[n * dim + s..n * dim + s + d],
                );
            }
            *pos = (*pos + 1) % cfg.ttt_mini_batch;
        }
        if let Some((w, b)) = &self.post_norm {
            let mut xhat = vec![0f32; dim];
            for row in y.chunks_exact_mut(dim) {
                normalize(row, &mut xhat);
                for j in 0..dim {
                    row[j] = xhat[j] * w[j] + b[j];
                }
            }
        }
        if let Some(gate) = gate {
            for (v, g) in y.iter_mut().zip(&gate) {
                *v *= gelu(*g);
            }
        }
        self.o.forward(&y, t)
    }
}

/// RoPE on interleaved pairs (x₂ᵢ, x₂ᵢ₊₁) with cos, sin per pair (the TTT inner Q/K).
#[inline(always)]
fn rope_pairs(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    for (i, pair) in x.chunks_exact_mut(2).enumerate() {
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * cos[i] - b * sin[i];
        pair[1] = a * sin[i] + b * cos[i];
    }
}

/// cos, sin (b × d/2) of the inner RoPE at every mini-batch position: training's tables.
fn inner_rope_tables(mini_batch: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
    let (cos, sin) = crate::model::ttt_linear::inner_rope_angles(mini_batch, 0, mini_batch, d);
    let f32s = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect();
    (f32s(cos), f32s(sin))
}

/// cos, sin of RoPE at one position ("rotate half" layout, head size d), as training computes them.
#[inline(always)]
fn rope_at(pos: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
    let half = d / 2;
    (0..d)
        .map(|i| {
            let freq = ROPE_THETA.powf(-((i % half) as f64) * 2.0 / d as f64);
            let angle = pos as f64 * freq;
            (angle.cos() as f32, angle.sin() as f32)
        })
        .unzip()
}

#[inline(always)]
fn apply_rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    let orig = x.to_vec();
    for i in 0..x.len() {
        let rot = if i < half {
            -orig[i + half]
        } else {
            orig[i - half]
        };
        x[i] = orig[i] * cos[i] + rot * sin[i];
    }
}

impl Attn {
    #[inline(always)]
    fn forward(
        &self,
        cfg: &ModelConfig,
        x: &[f32],
        t: usize,
        start: usize,
        window: Option<usize>,
        state: &mut LayerState,
    ) -> Vec<f32> {
        let (dim, nh, d) = (cfg.dim, cfg.n_heads, cfg.head_dim());
        let LayerState::Kv { k: kc, v: vc } = state else {
            unreachable!("attention layer with a TTT state")
        };
        let qkv = self.qkv.forward(x, t);
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        let mut y = vec![0f32; t * dim];
        for n in 0..t {
            let pos = start + n;
            let (cos, sin) = rope_at(pos, d);
            let row = &qkv[n * 3 * dim..(n + 1) * 3 * dim];
            let mut q = row[..dim].to_vec();
            let mut k = row[dim..2 * dim].to_vec();
            for h in 0..nh {
                apply_rope(&mut q[h * d..(h + 1) * d], &cos, &sin);
                apply_rope(&mut k[h * d..(h + 1) * d], &cos, &sin);
            }
            kc.extend_from_slice(&k);
            vc.extend_from_slice(&row[2 * dim..]);
            // Keys carry their RoPE rotation, so dropping the oldest keeps every score as it was.
            if let Some(w) = window {
                if kc.len() > w * dim {
                    let drop = kc.len() - w * dim;
                    kc.drain(..drop);
                    vc.drain(..drop);
                }
            }
            let s = kc.len() / dim;
            let mut scores = vec![0f32; s];
            for h in 0..nh {
                let qh = &q[h * d..(h + 1) * d];
                for (j, sc) in scores.iter_mut().enumerate() {
                    let kj = &kc[j * dim + h * d..j * dim + (h + 1) * d];
                    *sc = dot8(qh, kj) * scale;
                }
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
                let mut total = 0f32;
                for sc in scores.iter_mut() {
                    *sc = (*sc - max).exp();
                    total += *sc;
                }
                let out = &mut y[n * dim + h * d..n * dim + (h + 1) * d];
                for (j, p) in scores.iter().enumerate() {
                    let p = p / total;
                    let vj = &vc[j * dim + h * d..j * dim + (h + 1) * d];
                    for (o, v) in out.iter_mut().zip(vj) {
                        *o += p * v;
                    }
                }
            }
        }
        self.o.forward(&y, t)
    }
}

impl InferenceModel {
    /// Build from loaded weights (consumed; Q/K/V and gate/up are stacked to share their input).
    pub fn new(mut w: ModelWeights) -> Result<Self> {
        let cfg = w.cfg.clone();
        cfg.validate()?;
        let (linear_bytes, weight_bytes) = w.bytes();
        let (v, dim) = (cfg.vocab_size, cfg.dim);
        let embed = TokenTable::F32(FloatMatrix::new(w.take_dense("embed.weight")?, v, dim));
        let mut layers = Vec::with_capacity(cfg.n_layers);
        let (d, mb) = (cfg.head_dim(), cfg.ttt_mini_batch);
        for i in 0..cfg.n_layers {
            let p = |s: &str| format!("blocks.{i}.{s}");
            let mamba = cfg.mamba();
            let conv = |w: &mut ModelWeights, name: &str| -> Result<Conv> {
                Ok(Conv {
                    weight: w.take_dense(&p(&format!("{name}.weight")))?,
                    bias: w.take_dense(&p(&format!("{name}.bias")))?,
                    kernel: cfg.ttt_conv_kernel,
                })
            };
            let qkv = Linear::stack(vec![
                w.take_linear(&p("mixer.q.weight"))?,
                w.take_linear(&p(if mamba {
                    "mixer.v.weight"
                } else {
                    "mixer.k.weight"
                }))?,
                w.take_linear(&p(if mamba {
                    "mixer.gate.weight"
                } else {
                    "mixer.v.weight"
                }))?,
            ]);
            let o = w.take_linear(&p("mixer.o.weight"))?;
            let mixer = match cfg.mixer {
                MixerKind::Ttt => {
                    let tau = match cfg.ttt_token_eta {
                        TokenEta::Index => {
                            let off = w.take_dense(&p("mixer.token_eta.offset"))?;
                            // Training's arithmetic: (1/(t+1) as f32 + offset).relu().
                            (0..mb)
                                .map(|t| ((1.0 / (t + 1) as f64) as f32 + off[t]).max(0.0))
                                .collect()
                        }
                        TokenEta::None => vec![1.0; mb],
                    };
                    Mixer::Ttt(Box::new(Ttt {
                        qkv,
                        o,
                        lr: w.take_dense(&p("mixer.lr.weight"))?,
                        lr_bias: match cfg.ttt_lr_bias {
                            true => w.take_dense(&p("mixer.lr.bias"))?,
                            false => vec![0.0; cfg.n_heads],
                        },
                        tau,
                        w0: w.take_dense(&p("mixer.w0"))?,
                        b0: w.take_dense(&p("mixer.b0"))?,
                        ln_w: w.take_dense(&p("mixer.ln.weight"))?,
                        ln_b: w.take_dense(&p("mixer.ln.bias"))?,
                        post_norm: match cfg.ttt_post_norm {
                            true => Some((
                                w.take_dense(&p("mixer.post_norm.weight"))?,
                                w.take_dense(&p("mixer.post_norm.bias"))?,
                            )),
                            false => None,
                        },
                        rope: cfg.ttt_inner_rope.then(|| inner_rope_tables(mb, d)),
                        conv_qk: match mamba {
                            true => {
                                Some((conv(&mut w, "mixer.conv_q")?, conv(&mut w, "mixer.conv_k")?))
                            }
                            false => None,
                        },
                    }))
                }
                MixerKind::Attention => Mixer::Attention(Attn { qkv, o }),
            };
            let pre_conv = match mamba {
                true => Some((
                    w.take_dense(&p("pre_conv.norm.weight"))?,
                    conv(&mut w, "pre_conv.conv")?,
                )),
                false => None,
            };
            layers.push(Layer {
                pre_conv,
                norm1: w.take_dense(&p("norm1.weight"))?,
                mixer,
                norm2: w.take_dense(&p("norm2.weight"))?,
                gate_up: Linear::stack(vec![
                    w.take_linear(&p("mlp.gate.weight"))?,
                    w.take_linear(&p("mlp.up.weight"))?,
                ]),
                down: w.take_linear(&p("mlp.down.weight"))?,
            });
        }
        let norm = w.take_dense("norm.weight")?;
        let head = if cfg.tie_embeddings {
            None
        } else {
            Some(TokenTable::F32(FloatMatrix::new(
                w.take_dense("head.weight")?,
                v,
                dim,
            )))
        };
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            head,
            weight_bytes,
            linear_bytes,
            window: None,
        })
    }

    /// Attend to at most `window` tokens (see the field); `None` attends to the whole sequence.
    pub fn with_window(mut self, window: Option<usize>) -> Self {
        self.window = window.filter(|w| *w > 0);
        self
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Quantize the token tables (most of a small model's bytes once the block linears are packed): the
    /// output head to int8 with a scale per row; the input embedding, when untied, to 6-bit groups of 32
    /// (it is only looked up, and its rounding passes through a norm); a tied table to int8.
    pub fn with_int8_tables(mut self) -> Self {
        let before = self.embed.bytes() + self.head.as_ref().map_or(0, TokenTable::bytes);
        if self.head.is_some() {
            self.embed = self.embed.into_int6();
            self.head = self.head.map(TokenTable::into_int8);
        } else {
            self.embed = self.embed.into_int8();
        }
        let after = self.embed.bytes() + self.head.as_ref().map_or(0, TokenTable::bytes);
        self.weight_bytes = self.weight_bytes - before + after;
        self
    }

    /// Bytes of all weights in memory, and of the block linears alone.
    pub fn weight_bytes(&self) -> (usize, usize) {
        (self.weight_bytes, self.linear_bytes)
    }

    /// The state before the first token.
    pub fn new_state(&self) -> InferState {
        let layers = self
            .layers
            .iter()
            .map(|l| match &l.mixer {
                Mixer::Ttt(m) => {
                    let tail = (self.cfg.ttt_conv_kernel - 1) * self.cfg.dim;
                    let (qk, pre) = match self.cfg.mamba() {
                        true => (vec![0.0; tail], vec![0.0; tail]),
                        false => (Vec::new(), Vec::new()),
                    };
                    LayerState::Ttt {
                        w_base: m.w0.clone(),
                        b_base: m.b0.clone(),
                        acc_w: vec![0.0; m.w0.len()],
                        acc_b: vec![0.0; m.b0.len()],
                        pos: 0,
                        qk_tail: qk,
                        pre_tail: pre,
                    }
                }
                Mixer::Attention(_) => LayerState::Kv {
                    k: Vec::new(),
                    v: Vec::new(),
                },
            })
            .collect();
        InferState { pos: 0, layers }
    }

    /// Feed `tokens`, continuing `state`; returns the logits of every token (t × V) when `all_logits`, else
    /// those of the last token only (V).
    pub fn forward(
        &self,
        tokens: &[u32],
        state: &mut InferState,
        all_logits: bool,
    ) -> Result<Vec<f32>> {
        // Run the whole step on a rayon worker: the matrix products inside then split with cheap joins
        // instead of handing every one of them from this thread to the pool and back (two wake-ups each).
        rayon::scope(|_| {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2.
                return unsafe { self.forward_avx2(tokens, state, all_logits) };
            }
            self.forward_impl(tokens, state, all_logits)
        })
    }

    /// [`InferenceModel::forward`] with the per-token math (norms, TTT inner steps, attention) compiled for
    /// AVX2. No FMA contraction, so the results equal the portable build's.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn forward_avx2(
        &self,
        tokens: &[u32],
        state: &mut InferState,
        all_logits: bool,
    ) -> Result<Vec<f32>> {
        self.forward_impl(tokens, state, all_logits)
    }

    #[inline(always)]
    fn forward_impl(
        &self,
        tokens: &[u32],
        state: &mut InferState,
        all_logits: bool,
    ) -> Result<Vec<f32>> {
        let (dim, vocab) = (self.cfg.dim, self.cfg.vocab_size);
        let t = tokens.len();
        if t == 0 {
            bail!("no tokens to feed");
        }
        let mut x = Vec::with_capacity(t * dim);
        for &id in tokens {
            if id as usize >= vocab {
                bail!("token id {id} is outside the model's vocab of {vocab}");
            }
            self.embed.push_row(id as usize, &mut x);
        }
        let eps = self.cfg.norm_eps as f32;
        for (layer, st) in self.layers.iter().zip(state.layers.iter_mut()) {
            if let (Some((norm, conv)), LayerState::Ttt { pre_tail, .. }) =
                (&layer.pre_conv, &mut *st)
            {
                let padded = pad_with_tail(pre_tail, &rms_norm(&x, norm, eps));
                let y = conv.forward(&padded, t);
                x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
            }
            let h = rms_norm(&x, &layer.norm1, eps);
            let mixed = match &layer.mixer {
                Mixer::Ttt(m) => m.forward(&self.cfg, &h, t, st),
                Mixer::Attention(m) => m.forward(&self.cfg, &h, t, state.pos, self.window, st),
            };
            x.iter_mut().zip(&mixed).for_each(|(a, b)| *a += b);
            let h = rms_norm(&x, &layer.norm2, eps);
            let gu = layer.gate_up.forward(&h, t);
            let hidden = layer.down.cols();
            let mut act = Vec::with_capacity(t * hidden);
            for row in gu.chunks_exact(2 * hidden) {
                let (g, u) = row.split_at(hidden);
                act.extend(g.iter().zip(u).map(|(g, u)| g / (1.0 + (-g).exp()) * u));
            }
            let down = layer.down.forward(&act, t);
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
        state.pos += t;
        let (rows, n) = if all_logits {
            (&x[..], t)
        } else {
            (&x[(t - 1) * dim..], 1)
        };
        let h = rms_norm(rows, &self.norm, eps);
        let head = self.head.as_ref().unwrap_or(&self.embed);
        let mut logits = vec![0f32; n * vocab];
        head.forward(&h, n, &mut logits);
        Ok(logits)
    }
}

#[cfg(test)]
mod tests {
    use super::super::weights::LinearMode;
    use super::*;
    use crate::model::{build_seeded, WeightKind};
    use candle_core::{DType, Device, Module, Tensor};
    use std::collections::HashMap;

    fn cfg(mixer: MixerKind, weights: WeightKind, tie: bool) -> ModelConfig {
        ModelConfig {
            vocab_size: 61,
            dim: 32,
            n_layers: 2,
            n_heads: 2,
            mixer,
            weights,
            mlp_hidden: Some(72),
            ttt_mini_batch: 4,
            ttt_base_lr: 1.0,
            tie_embeddings: tie,
            ..Default::default()
        }
    }

    fn tokens(t: usize, vocab: u32) -> Vec<u32> {
        (0..t as u32)
            .map(|i| i.wrapping_mul(2_654_435_761).wrapping_add(7 * i) % vocab)
            .collect()
    }

    fn tensors(varmap: &candle_nn::VarMap) -> HashMap<String, Tensor> {
        varmap
            .data()
            .lock()
            .expect("varmap lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect()
    }

    /// max |a − b| / max |b|.
    fn rel(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    /// The training model, fed token by token with its carried state (TTT) / KV cache (attention), gives the
    /// logits of its parallel forward pass.
    #[test]
    fn training_model_token_by_token_equals_parallel() -> anyhow::Result<()> {
        for mixer in [MixerKind::Ttt, MixerKind::Attention] {
            let c = ModelConfig {
                weights: WeightKind::Ternary,
                ..cfg(mixer, WeightKind::Ternary, false)
            };
            let (_vm, model) = build_seeded(&c, 3, DType::F32, &Device::Cpu)?;
            let ids = tokens(13, 61);
            let x = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let whole: Vec<f32> = model.forward(&x)?.flatten_all()?.to_vec1()?;
            let mut state = None;
            let mut steps = Vec::new();
            for i in 0..ids.len() {
                let (l, s) = model.forward_with_state(&x.narrow(1, i, 1)?, state)?;
                steps.extend(l.flatten_all()?.to_vec1::<f32>()?);
                state = Some(s);
            }
            let r = rel(&steps, &whole);
            assert!(r < 1e-4, "{mixer}: token by token vs parallel rel diff {r}");
        }
        Ok(())
    }

    /// Quantized token tables: their bytes drop (6.5-bit embedding + int8 head, or one int8 tied table) and
    /// the logits stay within their rounding of the f32 tables' logits.
    #[test]
    fn quantized_tables_keep_the_logits_close() -> anyhow::Result<()> {
        for mixer in [MixerKind::Ttt, MixerKind::Attention] {
            for tie in [false, true] {
                let c = cfg(mixer, WeightKind::Ternary, tie);
                let (vm, _) = build_seeded(&c, 5, DType::F32, &Device::Cpu)?;
                let w = |_| ModelWeights::from_tensors(&c, &tensors(&vm), LinearMode::Packed);
                let f32m = InferenceModel::new(w(())?)?;
                let q = InferenceModel::new(w(())?)?.with_int8_tables();
                let table = c.vocab_size * c.dim;
                let (fb, qb) = (f32m.weight_bytes().0, q.weight_bytes().0);
                let saved = if tie {
                    4 * table - (table + 4 * c.vocab_size)
                } else {
                    8 * table - (table + 4 * c.vocab_size) - (table * 6 / 8 + 2 * table / 32)
                };
                assert_eq!(fb - qb, saved, "{mixer} tie={tie}");
                let ids = tokens(11, 61);
                let a = f32m.forward(&ids, &mut f32m.new_state(), true)?;
                let b = q.forward(&ids, &mut q.new_state(), true)?;
                let r = rel(&b, &a);
                // Random weights with near-tied logits amplify the rounding (measured 2–5 %); on the trained
                // 10-minute TinyStories models the val NLL moved by 3e-4 nats.
                assert!(r > 0.0 && r < 0.1, "{mixer} tie={tie}: rel diff {r}");
            }
        }
        Ok(())
    }

    /// The inference model equals the training model (eval) for both mixers, both weight kinds, tied or not,
    /// packed or dequantized; and its token-by-token logits equal its prompt-at-once logits exactly.
    #[test]
    fn inference_model_equals_training_model() -> anyhow::Result<()> {
        // The authors' TTT details with non-zero learned offsets, biases and post-norm; the engine's first
        // definition (legacy); the Mamba backbone.
        let variants = |c: ModelConfig| match c.mixer {
            MixerKind::Ttt => vec![
                c.clone(),
                c.clone().legacy(),
                ModelConfig {
                    ttt_backbone: crate::model::Backbone::Mamba,
                    ..c
                },
            ],
            MixerKind::Attention => vec![c],
        };
        for mixer in [MixerKind::Ttt, MixerKind::Attention] {
            for (weights, tie) in [
                (WeightKind::Ternary, false),
                (WeightKind::Ternary, true),
                (WeightKind::Float, false),
            ] {
                for c in variants(cfg(mixer, weights, tie)) {
                    let (vm, model) = build_seeded(&c, 5, DType::F32, &Device::Cpu)?;
                    crate::model::init::perturb_constant_inits(&vm)?;
                    let ids = tokens(11, 61);
                    let x = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
                    let want: Vec<f32> = model.forward(&x)?.flatten_all()?.to_vec1()?;
                    for mode in [LinearMode::Packed, LinearMode::Dequantized] {
                        let w = ModelWeights::from_tensors(&c, &tensors(&vm), mode)?;
                        let inf = InferenceModel::new(w)?;
                        let mut st = inf.new_state();
                        let all = inf.forward(&ids, &mut st, true)?;
                        let r = rel(&all, &want);
                        // Measured ~1e-6; ternary models get room for an int8 rounding that flips on
                        // another CPU's float kernel.
                        let tol = if weights == WeightKind::Float {
                            1e-5
                        } else {
                            1e-3
                        };
                        assert!(
                            r < tol,
                            "{mixer} {weights} tie={tie} {mode:?} {:?}/{:?}: rel diff {r}",
                            c.ttt_backbone,
                            c.ttt_token_eta
                        );
                        // Token by token, and a split prompt, give exactly the same logits.
                        let mut st = inf.new_state();
                        let mut steps = Vec::new();
                        for id in &ids {
                            steps.extend(inf.forward(&[*id], &mut st, true)?);
                        }
                        assert_eq!(steps, all, "{mixer} {weights} {mode:?}: token by token");
                        let mut st = inf.new_state();
                        inf.forward(&ids[..6], &mut st, false)?;
                        let last = inf.forward(&ids[6..], &mut st, false)?;
                        assert_eq!(last, all[10 * 61..].to_vec());
                        assert_eq!(st.position(), 11);
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn ttt_state_is_constant_size_and_kv_grows() -> anyhow::Result<()> {
        for mixer in [MixerKind::Ttt, MixerKind::Attention] {
            let c = cfg(mixer, WeightKind::Ternary, false);
            let (vm, _) = build_seeded(&c, 1, DType::F32, &Device::Cpu)?;
            let inf = InferenceModel::new(ModelWeights::from_tensors(
                &c,
                &tensors(&vm),
                LinearMode::Packed,
            )?)?;
            let mut st = inf.new_state();
            inf.forward(&tokens(3, 61), &mut st, false)?;
            let a = st.floats();
            inf.forward(&tokens(20, 61), &mut st, false)?;
            let b = st.floats();
            match mixer {
                MixerKind::Ttt => assert_eq!(a, b),
                MixerKind::Attention => assert!(b > a),
            }
        }
        Ok(())
    }
}
