//! Causal multi-head softmax attention with rotary position embeddings (RoPE, Su et al. 2021),
//! the comparison mixer (`mixer = "attention"`).

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::bit_linear::{BitLinear, LinearKind};
use crate::cpu_f32;

/// RoPE base frequency.
pub const ROPE_THETA: f64 = 10_000.0;

/// Keys and values of the tokens seen so far, (B,H,S,d) each: the decoder's KV cache.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub k: Tensor,
    pub v: Tensor,
    /// Position of the next token (for RoPE): more than `len()` once [`Self::keep_last`] dropped keys.
    pub pos: usize,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.k.dim(2).unwrap_or(0)
    }

    /// Keep only the newest `window` positions (a sliding attention window for generation past the
    /// trained context). Keys carry their RoPE rotation, so the kept scores do not change.
    pub fn keep_last(&mut self, window: usize) -> Result<()> {
        let n = self.len();
        if n > window {
            self.k = self.k.narrow(2, n - window, window)?.contiguous()?;
            self.v = self.v.narrow(2, n - window, window)?.contiguous()?;
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone)]
pub struct Attention {
    q: BitLinear,
    k: BitLinear,
    v: BitLinear,
    o: BitLinear,
    n_heads: usize,
    head_dim: usize,
}

/// cos and sin tables (T, d) for positions offset..offset+T, "rotate half" layout.
fn rope_tables(t: usize, offset: usize, d: usize, like: &Tensor) -> Result<(Tensor, Tensor)> {
    let half = d / 2;
    let mut cos = Vec::with_capacity(t * d);
    let mut sin = Vec::with_capacity(t * d);
    for pos in offset..offset + t {
        for i in 0..d {
            let freq = ROPE_THETA.powf(-((i % half) as f64) * 2.0 / d as f64);
            let angle = pos as f64 * freq;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let dev = like.device();
    let cos = Tensor::from_vec(cos, (t, d), dev)?.to_dtype(like.dtype())?;
    let sin = Tensor::from_vec(sin, (t, d), dev)?.to_dtype(like.dtype())?;
    Ok((cos, sin))
}

/// x·cos + rotate_half(x)·sin for x (B,H,T,d).
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

impl Attention {
    pub fn new(
        dim: usize,
        n_heads: usize,
        kind: impl Into<LinearKind>,
        std: f64,
        out_std: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let kind = kind.into();
        Ok(Self {
            q: BitLinear::new(dim, dim, kind, std, vb.pp("q"))?,
            k: BitLinear::new(dim, dim, kind, std, vb.pp("k"))?,
            v: BitLinear::new(dim, dim, kind, std, vb.pp("v"))?,
            o: BitLinear::new(dim, dim, kind, out_std, vb.pp("o"))?,
            n_heads,
            head_dim: dim / n_heads,
        })
    }

    /// Attend from the chunk x (B,T,D) to the cached tokens and to itself; returns the output and the cache
    /// extended by this chunk.
    pub fn forward_with_cache(
        &self,
        x: &Tensor,
        cache: Option<KvCache>,
    ) -> Result<(Tensor, KvCache)> {
        let (b, t, dim) = x.dims3()?;
        // Keys cached (where this chunk's causal mask starts) and the chunk's first RoPE position.
        let offset = cache.as_ref().map_or(0, KvCache::len);
        let pos = cache.as_ref().map_or(0, |c| c.pos);
        let heads = |y: Tensor| -> Result<Tensor> {
            y.reshape((b, t, self.n_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (cos, sin) = rope_tables(t, pos, self.head_dim, x)?;
        let q = apply_rope(&heads(self.q.forward(x)?)?, &cos, &sin)?;
        let k = apply_rope(&heads(self.k.forward(x)?)?, &cos, &sin)?;
        let v = heads(self.v.forward(x)?)?;
        let (k, v) = match cache {
            Some(c) => (Tensor::cat(&[&c.k, &k], 2)?, Tensor::cat(&[&c.v, &v], 2)?),
            None => (k, v),
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = super::precision::matmul(&q, &k.t()?)?;
        let probs = if scores.device().is_cpu() && scores.dtype() == DType::F32 {
            scores.contiguous()?.apply_op1(CausalSoftmax {
                scale: scale as f32,
                offset,
            })?
        } else {
            causal_softmax_composed(&scores, scale, offset)?
        };
        let y = super::precision::matmul(&probs, &v)?
            .transpose(1, 2)?
            .reshape((b, t, dim))?;
        Ok((self.o.forward(&y)?, KvCache { k, v, pos: pos + t }))
    }
}

/// softmax(S·scale + M) over the last dim, with M = −∞ above the causal diagonal (query i of a chunk that
/// starts at `offset` sees keys 0 ..= offset + i), from candle ops.
fn causal_softmax_composed(scores: &Tensor, scale: f64, offset: usize) -> Result<Tensor> {
    let (t, s) = (scores.dim(2)?, scores.dim(3)?);
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, s), scores.device())?.to_dtype(scores.dtype())?;
    candle_nn::ops::softmax(&(scores * scale)?.broadcast_add(&mask)?, D::Minus1)
}

/// The causal scaled softmax as one op on CPU: one pass per row forward, one backward
/// (∂S = scale · P ⊙ (∂P − Σ ∂P ⊙ P)), instead of the scale, mask, max, exp, sum and divide nodes.
struct CausalSoftmax {
    scale: f32,
    offset: usize,
}

impl CausalSoftmax {
    /// Keys visible to row `r` of a (…, t, s) score tensor.
    fn visible(&self, r: usize, t: usize, s: usize) -> usize {
        (self.offset + r % t + 1).min(s)
    }
}

impl candle_core::CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let data = cpu_f32::slice(storage, layout, "causal softmax")?;
        let dims = layout.dims();
        let (t, s) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let mut out = vec![0f32; data.len()];
        out.par_chunks_mut(s)
            .zip(data.par_chunks(s))
            .enumerate()
            .for_each(|(r, (p, x))| {
                let n = self.visible(r, t, s);
                let m = x[..n].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * self.scale;
                let mut sum = 0f32;
                for (p, &x) in p[..n].iter_mut().zip(&x[..n]) {
                    *p = (x * self.scale - m).exp();
                    sum += *p;
                }
                let inv = 1.0 / sum;
                for p in &mut p[..n] {
                    *p *= inv;
                }
            });
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _scores: &Tensor, probs: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dims = probs.dims().to_vec();
        let (t, s) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let p = cpu_f32::view(probs);
        let p = p.slice("causal softmax")?;
        // The output buffer starts as a copy of ∂P and is turned into ∂S in place.
        let mut g: Vec<f32> = grad.flatten_all()?.to_vec1()?;
        g.par_chunks_mut(s)
            .zip(p.par_chunks(s))
            .enumerate()
            .for_each(|(r, (g, p))| {
                let n = self.visible(r, t, s);
                let dot: f32 = g[..n].iter().zip(&p[..n]).map(|(g, p)| g * p).sum();
                for (g, &p) in g[..n].iter_mut().zip(&p[..n]) {
                    *g = self.scale * p * (*g - dot);
                }
                g[n..].fill(0.0);
            });
        Ok(Some(Tensor::from_vec(g, dims, probs.device())?))
    }
}

impl Module for Attention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_cache(x, None)?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_causal_softmax_matches_composed_value_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        // A chunk of 4 queries continuing after 2 cached keys: 6 keys in all.
        let x = Var::randn(0f32, 2.0, (2, 3, 4, 6), &dev)?;
        let op = CausalSoftmax {
            scale: 0.5,
            offset: 2,
        };
        let fused = x.as_tensor().apply_op1(op)?;
        let composed = causal_softmax_composed(x.as_tensor(), 0.5, 2)?;
        let diff = (&fused - &composed)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "forward differs by {diff}");
        let w = crate::model::init::seeded_randn(105, 0.0, 1.0, (2, 3, 4, 6), DType::F32, &dev)?;
        let ga = (fused * &w)?.sum_all()?.backward()?;
        let gb = (composed * &w)?.sum_all()?.backward()?;
        let (a, b) = (
            ga.get(x.as_tensor()).unwrap(),
            gb.get(x.as_tensor()).unwrap(),
        );
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "gradients differ by {diff}");
        Ok(())
    }
}
