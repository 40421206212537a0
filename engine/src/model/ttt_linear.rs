//! TTT-Linear (Sun et al. 2024, "Learning to (Learn at Test Time): RNNs with Expressive Hidden States",
//! arXiv 2407.04620), computed in the dual form.
//!
//! Per head the hidden state is a d×d matrix W and bias b. For each token the inner model
//! f(k) = k + LN(k W + b) takes one gradient step on the self-supervised loss ½‖f(θ_K x) − θ_V x‖²
//! (Sec. 2.1, eq. 3–4, with the residual + LN inner model of Sec. 2.7), and the output is f(θ_Q x) (eq. 5).
//! Tokens are grouped in mini-batches of b tokens: all gradients of a mini-batch are taken at the W of its
//! start, W_t = W_0 − Σ_{s≤t} η_s ∇ℓ_s(W_0) (Sec. 2.4, eq. 6–7), and the dual form (Sec. 2.5) computes the
//! outputs of a whole mini-batch with matmuls instead of materialising every W_t.
//!
//! Simplifications against the paper (also listed in the README): no learnable token-index scaling of η,
//! no gating or causal convolution (the "Mamba backbone" variant), no post-LN before the output projection;
//! the factor 2 of the squared loss is folded into η. The inner learning rate is
//! η(x) = η_base · sigmoid(θ_lr · x) / d, one per head and token (Sec. 2.7, "learnable η").

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

use super::bit_linear::BitLinear;
use super::config::WeightKind;

/// ε of the inner model's layer norm.
pub const INNER_LN_EPS: f64 = 1e-6;

/// The carried hidden state of a TTT layer for a batch of sequences: what a chunked forward pass or a
/// token-by-token decoder needs to continue exactly where the previous chunk stopped (O(1) in length).
#[derive(Debug, Clone)]
pub struct TttState {
    /// W, b at the start of the current mini-batch: inner gradients are taken here. (B,H,d,d), (B,H,1,d).
    pub w_base: Tensor,
    pub b_base: Tensor,
    /// W, b after the tokens of the current mini-batch seen so far. Same shapes.
    pub w: Tensor,
    pub b: Tensor,
    /// How many tokens of the current mini-batch have been seen (0 ≤ pos < mini-batch size).
    pub pos: usize,
}

impl TttState {
    /// Detach from the autograd graph (e.g. to carry a state across training windows).
    pub fn detach(&self) -> Self {
        Self {
            w_base: self.w_base.detach(),
            b_base: self.b_base.detach(),
            w: self.w.detach(),
            b: self.b.detach(),
            pos: self.pos,
        }
    }
}

/// A TTT-Linear token mixer.
#[derive(Debug, Clone)]
pub struct TttLinear {
    q: BitLinear,
    k: BitLinear,
    v: BitLinear,
    o: BitLinear,
    /// θ_lr: (H, D), a plain float projection to one learning-rate logit per head.
    lr: Tensor,
    /// Learned initial state W0 (H,d,d), b0 (H,1,d).
    w0: Tensor,
    b0: Tensor,
    /// Inner layer norm scale and shift, (H,1,d).
    ln_weight: Tensor,
    ln_bias: Tensor,
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
        self.apply(&normalize(z)?.0)
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

/// Layer-norm pieces over the last dim: x̂ = (z − μ)/σ and 1/σ.
fn normalize(z: &Tensor) -> Result<(Tensor, Tensor)> {
    let mu = z.mean_keepdim(D::Minus1)?;
    let centered = z.broadcast_sub(&mu)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_std = (var + INNER_LN_EPS)?.sqrt()?.recip()?;
    Ok((centered.broadcast_mul(&inv_std)?, inv_std))
}

impl TttLinear {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dim: usize,
        n_heads: usize,
        mini_batch: usize,
        base_lr: f64,
        kind: WeightKind,
        std: f64,
        out_std: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let d = dim / n_heads;
        let normal = |stdev| Init::Randn { mean: 0.0, stdev };
        Ok(Self {
            q: BitLinear::new(dim, dim, kind, std, vb.pp("q"))?,
            k: BitLinear::new(dim, dim, kind, std, vb.pp("k"))?,
            v: BitLinear::new(dim, dim, kind, std, vb.pp("v"))?,
            o: BitLinear::new(dim, dim, kind, out_std, vb.pp("o"))?,
            lr: vb.get_with_hints((n_heads, dim), "lr.weight", normal(std))?,
            w0: vb.get_with_hints((n_heads, d, d), "w0", normal(std))?,
            b0: vb.get_with_hints((n_heads, 1, d), "b0", Init::Const(0.0))?,
            ln_weight: vb.get_with_hints((n_heads, 1, d), "ln.weight", Init::Const(1.0))?,
            ln_bias: vb.get_with_hints((n_heads, 1, d), "ln.bias", Init::Const(0.0))?,
            n_heads,
            head_dim: d,
            mini_batch,
            base_lr,
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
            w_base: w.clone(),
            b_base: b.clone(),
            w,
            b,
            pos: 0,
        })
    }

    /// LN of the inner model with the learned per-head scale and shift.
    #[cfg(test)]
    fn inner_ln(&self, z: &Tensor) -> Result<Tensor> {
        LnParams::of(self).layer_norm(z)
    }

    /// ∂ℓ/∂Z of the inner loss ℓ = ½‖LN(Z) − (v − k)‖² at Z = k W_base + b_base (the reconstruction
    /// target is v − k because f has a residual connection), through the layer norm's backward.
    fn inner_grad_z(
        &self,
        k: &Tensor,
        v: &Tensor,
        w_base: &Tensor,
        b_base: &Tensor,
        ln: &LnParams,
    ) -> Result<Tensor> {
        let z = k.matmul(w_base)?.broadcast_add(b_base)?;
        let (xhat, inv_std) = normalize(&z)?;
        let ln_out = ln.apply(&xhat)?;
        let g = (ln_out - (v - k)?)?.broadcast_mul(&ln.weight)?; // ∂ℓ/∂x̂
        let g_mean = g.mean_keepdim(D::Minus1)?;
        let gx_mean = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
        // ∂ℓ/∂Z = (g − mean(g) − x̂·mean(g ⊙ x̂)) / σ
        g.broadcast_sub(&g_mean)?
            .sub(&xhat.broadcast_mul(&gx_mean)?)?
            .broadcast_mul(&inv_std)
    }

    /// One (part of a) mini-batch in the dual form. q, k, v: (B,H,m,d); eta: (B,H,m,1).
    /// Returns the inner outputs Z_q (before f's residual and LN) and the updated state W, b.
    fn dual_step(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        eta: &Tensor,
        state: &TttState,
        ln: &LnParams,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let m = q.dim(2)?;
        let dz = self.inner_grad_z(k, v, &state.w_base, &state.b_base, ln)?;
        // Dual form (Sec. 2.5): Z_q = Q W + b − (tril(Q Kᵀ + 1) ⊙ η_sᵀ) ∇Z, causal inside the mini-batch.
        let mask = Tensor::tril2(m, q.dtype(), q.device())?;
        let scores = (q.matmul(&k.t()?)? + 1.0)?
            .broadcast_mul(&mask)?
            .broadcast_mul(&eta.transpose(2, 3)?)?;
        let zq = q
            .matmul(&state.w)?
            .broadcast_add(&state.b)?
            .sub(&scores.matmul(&dz)?)?;
        // End-of-chunk state: W ← W − Kᵀ (η ⊙ ∇Z), b ← b − Σ_s η_s ∇Z_s  (eq. 6 summed over the chunk).
        let eta_dz = dz.broadcast_mul(eta)?;
        let w = (&state.w - k.t()?.matmul(&eta_dz)?)?;
        let b = (&state.b - eta_dz.sum_keepdim(2)?)?;
        Ok((zq, w, b))
    }

    /// Projections to per-head (B,H,T,d) tensors and the token-dependent inner learning rate (B,H,T,1).
    fn project(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let heads = |y: Tensor| -> Result<Tensor> {
            y.reshape((b, t, self.n_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(self.q.forward(x)?)?;
        let k = heads(self.k.forward(x)?)?;
        let v = heads(self.v.forward(x)?)?;
        // η(x) = η_base · sigmoid(θ_lr x) / d
        let logits = x.broadcast_matmul(&self.lr.t()?)?; // (B,T,H)
        let sig = (logits.neg()?.exp()? + 1.0)?.recip()?;
        let eta = sig
            .affine(self.base_lr / self.head_dim as f64, 0.0)?
            .transpose(1, 2)?
            .unsqueeze(3)?
            .contiguous()?;
        Ok((q, k, v, eta))
    }

    /// Mix a chunk x (B,T,D) continuing from `state` (or from W0 when `None`); returns the output and the
    /// state after the chunk. Chunks may end anywhere, also inside a mini-batch.
    pub fn forward_with_state(
        &self,
        x: &Tensor,
        state: Option<TttState>,
    ) -> Result<(Tensor, TttState)> {
        let (b, t, dim) = x.dims3()?;
        let (q, k, v, eta) = self.project(x)?;
        let mut state = match state {
            Some(s) => s,
            None => self.initial_state(b)?,
        };
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
            let (qs, ks, vs, es) = (part(&q)?, part(&k)?, part(&v)?, part(&eta)?);
            let ln = match &full {
                Some(full) if len == self.mini_batch => full,
                _ => &per_head,
            };
            let (zq, w, bias) = self.dual_step(&qs, &ks, &vs, &es, &state, ln)?;
            outs.push((&qs + ln.layer_norm(&zq)?)?); // f(q) = q + LN(Z_q), eq. 5
            state.w = w;
            state.b = bias;
            state.pos += len;
            if state.pos == self.mini_batch {
                state.w_base = state.w.clone();
                state.b_base = state.b.clone();
                state.pos = 0;
            }
            start += len;
        }
        let y = Tensor::cat(&outs, 2)?
            .transpose(1, 2)?
            .reshape((b, t, dim))?;
        Ok((self.o.forward(&y)?, state))
    }

    /// Reference implementation for tests: the primal form, token by token, with the inner gradient taken
    /// by autograd instead of the closed-form LN backward.
    #[cfg(test)]
    pub(crate) fn forward_primal(&self, x: &Tensor) -> Result<Tensor> {
        use candle_core::Var;
        let (bsz, t, dim) = x.dims3()?;
        let (q, k, v, eta) = self.project(x)?;
        let init = self.initial_state(bsz)?;
        let (mut w, mut b) = (init.w.detach(), init.b.detach());
        let (mut w_base, mut b_base) = (w.clone(), b.clone());
        let mut outs = Vec::new();
        for i in 0..t {
            if i % self.mini_batch == 0 {
                w_base = w.clone();
                b_base = b.clone();
            }
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
            w = (w - gw.broadcast_mul(&ei)?)?;
            b = (b - gb.broadcast_mul(&ei)?)?;
            let zq = qi.matmul(&w)?.broadcast_add(&b)?;
            outs.push((&qi + self.inner_ln(&zq)?)?);
        }
        let y = Tensor::cat(&outs, 2)?
            .transpose(1, 2)?
            .reshape((bsz, t, dim))?;
        self.o.forward(&y)
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
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn layer(dtype: DType, mini_batch: usize, kind: WeightKind) -> Result<(VarMap, TttLinear)> {
        let varmap = VarMap::new();
        let vb = crate::model::init::seeded_var_builder(&varmap, 7, dtype, &Device::Cpu);
        // A large std so that the inner loop actually moves W and the test is sensitive.
        let l = TttLinear::new(32, 4, mini_batch, 1.0, kind, 0.2, 0.2, vb.pp("ttt"))?;
        Ok((varmap, l))
    }

    #[test]
    fn dual_form_equals_primal_for_ragged_lengths() -> Result<()> {
        let (_vm, l) = layer(DType::F64, 4, WeightKind::Float)?;
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
        let (_vm, l) = layer(DType::F64, 4, WeightKind::Float)?;
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
