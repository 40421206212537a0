//! Causal multi-head softmax attention with rotary position embeddings (RoPE, Su et al. 2021),
//! the comparison mixer (`mixer = "attention"`).

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::bit_linear::BitLinear;
use super::config::WeightKind;

/// RoPE base frequency.
const ROPE_THETA: f64 = 10_000.0;

/// Keys and values of the tokens seen so far, (B,H,S,d) each: the decoder's KV cache.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub k: Tensor,
    pub v: Tensor,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.k.dim(2).unwrap_or(0)
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
        kind: WeightKind,
        std: f64,
        out_std: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
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
        let offset = cache.as_ref().map_or(0, KvCache::len);
        let heads = |y: Tensor| -> Result<Tensor> {
            y.reshape((b, t, self.n_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (cos, sin) = rope_tables(t, offset, self.head_dim, x)?;
        let q = apply_rope(&heads(self.q.forward(x)?)?, &cos, &sin)?;
        let k = apply_rope(&heads(self.k.forward(x)?)?, &cos, &sin)?;
        let v = heads(self.v.forward(x)?)?;
        let (k, v) = match cache {
            Some(c) => (Tensor::cat(&[&c.k, &k], 2)?, Tensor::cat(&[&c.v, &v], 2)?),
            None => (k, v),
        };
        let s = offset + t;
        // softmax(Q Kᵀ / √d + M) V with M = −∞ above the causal diagonal.
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
        let mask = Tensor::from_vec(mask, (t, s), x.device())?.to_dtype(x.dtype())?;
        let scores = (super::precision::matmul(&q, &k.t()?)? / (self.head_dim as f64).sqrt())?
            .broadcast_add(&mask)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let y = super::precision::matmul(&probs, &v)?
            .transpose(1, 2)?
            .reshape((b, t, dim))?;
        Ok((self.o.forward(&y)?, KvCache { k, v }))
    }
}

impl Module for Attention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_cache(x, None)?.0)
    }
}
