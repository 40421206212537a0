//! BitLinear (BitNet b1.58, Ma et al. 2024, arXiv 2402.17764): ternary weights, 8-bit activations.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use rayon::prelude::*;

pub use super::config::QuantEps;
use super::config::WeightKind;
use crate::cpu_f32;

/// ε guarding the absmean / absmax scales against division by zero.
const QUANT_EPS: f64 = 1e-5;

impl QuantEps {
    /// The scale as guarded: max(s, ε) (BitNet's code) or s + ε.
    pub fn guard(self, s: f64) -> f64 {
        match self {
            QuantEps::Clamp => s.max(QUANT_EPS),
            QuantEps::Add => s + QUANT_EPS,
        }
    }

    /// [`QuantEps::guard`] in f32 arithmetic (the fused CPU ops and the inference kernels).
    pub fn guard_f32(self, s: f32) -> f32 {
        match self {
            QuantEps::Clamp => s.max(QUANT_EPS as f32),
            QuantEps::Add => s + QUANT_EPS as f32,
        }
    }
}

/// What a BitLinear computes: ternary or float weights, and how its quantisers guard their scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearKind {
    pub weights: WeightKind,
    pub eps: QuantEps,
}

impl From<WeightKind> for LinearKind {
    fn from(weights: WeightKind) -> Self {
        Self {
            weights,
            eps: QuantEps::Clamp,
        }
    }
}

/// Weight quantisation, eq. (1)–(3): W̃ = RoundClip(W / γ̂, −1, 1), γ = mean|W|, γ̂ = γ guarded by `eps`.
/// Returns the ternary matrix {-1, 0, +1} (as floats) and γ. On CPU it is computed exactly as the fused
/// training op computes it, so that packed inference multiplies by the very weights training saw.
pub fn ternary_quantize(w: &Tensor, eps: QuantEps) -> Result<(Tensor, f64)> {
    if w.device().is_cpu() && w.dtype() == DType::F32 {
        let v = w.flatten_all()?.to_vec1::<f32>()?;
        let gamma = absmean(&v);
        let inv = ternary_inv(gamma, eps);
        let q: Vec<f32> = v.iter().map(|&x| ternary_level(x, inv)).collect();
        return Ok((Tensor::from_vec(q, w.shape(), w.device())?, gamma));
    }
    let gamma = w
        .abs()?
        .mean_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    let q = (w / eps.guard(gamma))?.round()?.clamp(-1.0, 1.0)?;
    Ok((q, gamma))
}

/// γ = mean|W|, summed in f64 over fixed blocks (the same value whatever the thread count).
fn absmean(w: &[f32]) -> f64 {
    let sums: Vec<f64> = w
        .par_chunks(1 << 14)
        .map(|c| c.iter().map(|&x| x.abs() as f64).sum::<f64>())
        .collect();
    sums.iter().sum::<f64>() / w.len().max(1) as f64
}

/// 1 / γ̂, the factor that maps latent weights onto the ternary grid.
fn ternary_inv(gamma: f64, eps: QuantEps) -> f32 {
    (1.0 / eps.guard(gamma)) as f32
}

/// RoundClip(w / γ̂, −1, 1) given 1 / γ̂.
fn ternary_level(w: f32, inv: f32) -> f32 {
    round_clip(w * inv, -1.0, 1.0)
}

/// `y.round().clamp(lo, hi)` bit for bit (ties away from zero, NaN stays NaN) for integral bounds of
/// magnitude below 2²¹, in a form the compiler vectorises (`f32::round` is a libm call per element): y is
/// first clamped to [lo − 1, hi + 1], which cannot change the result, then rounded with the 1.5·2²³ trick
/// (ties to even) and ties moved away from zero.
#[inline(always)]
pub(crate) fn round_clip(y: f32, lo: f32, hi: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2²³: (y + MAGIC) − MAGIC rounds |y| < 2²² to an integer
    let y = y.clamp(lo - 1.0, hi + 1.0);
    let even = (y + MAGIC) - MAGIC;
    let r = match (y - even).abs() == 0.5 {
        true => y + 0.5f32.copysign(y),
        false => even,
    };
    r.copysign(y).clamp(lo, hi)
}

/// γ·W̃ with a straight-through backward, in one pass on CPU (the composed form makes nine full-size
/// passes and an extra graph node per linear per step).
struct FakeTernaryWeights(QuantEps);

impl candle_core::CustomOp1 for FakeTernaryWeights {
    fn name(&self) -> &'static str {
        "fake-quant-ternary"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let w = cpu_f32::slice(storage, layout, "fused ternary quantisation")?;
        let gamma = absmean(w);
        let (inv, g) = (ternary_inv(gamma, self.0), gamma as f32);
        let mut out = vec![0f32; w.len()];
        out.par_chunks_mut(1 << 14)
            .zip(w.par_chunks(1 << 14))
            .for_each(|(o, w)| {
                for (o, &w) in o.iter_mut().zip(w) {
                    *o = ternary_level(w, inv) * g;
                }
            });
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // Straight-through: ∂(γW̃)/∂W ≈ 1.
        Ok(Some(grad_res.clone()))
    }
}

/// Activation quantisation (BitNet eq. (4)–(5), per token): x̃ = Clip(round(x · 127 / max|x|), −128, 127),
/// de-quantised back to x̃ · max|x| / 127 (max|x| guarded by `eps`).
pub fn quantize_activations(x: &Tensor, eps: QuantEps) -> Result<Tensor> {
    let absmax = x.abs()?.max_keepdim(D::Minus1)?;
    let guarded = match eps {
        QuantEps::Clamp => absmax.maximum(QUANT_EPS)?,
        QuantEps::Add => (absmax + QUANT_EPS)?,
    };
    let scale = guarded.affine(1.0 / 127.0, 0.0)?;
    x.broadcast_div(&scale)?
        .round()?
        .clamp(-128.0, 127.0)?
        .broadcast_mul(&scale)
}

/// Straight-through estimator: the forward value of `quantized`, the gradient of `latent`.
fn ste(latent: &Tensor, quantized: &Tensor) -> Result<Tensor> {
    latent + (quantized - latent)?.detach()
}

/// Per-token 8-bit fake quantisation with a straight-through backward, fused into one pass on CPU (the
/// composed version above makes a dozen full-size temporaries per linear). Same arithmetic as
/// [`quantize_activations`].
struct FakeQuantActivations(QuantEps);

impl candle_core::CustomOp1 for FakeQuantActivations {
    fn name(&self) -> &'static str {
        "fake-quant-int8"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = cpu_f32::slice(storage, layout, "fused activation quantisation")?;
        let row = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = x.to_vec();
        out.par_chunks_mut(row).for_each(|r| {
            let absmax = r.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = (self.0.guard(absmax as f64) / 127.0) as f32;
            for v in r.iter_mut() {
                *v = round_clip(*v / scale, -128.0, 127.0) * scale;
            }
        });
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // Straight-through: ∂x̃/∂x ≈ 1.
        Ok(Some(grad_res.clone()))
    }
}

/// 8-bit activations through the STE: fused on CPU for f32, composed ops elsewhere.
fn quantize_activations_ste(x: &Tensor, eps: QuantEps) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(FakeQuantActivations(eps))
    } else {
        ste(x, &quantize_activations(x, eps)?)
    }
}

/// A bias-free linear layer whose weights are ternary in the forward pass (or plain with `WeightKind::Float`).
#[derive(Debug, Clone)]
pub struct BitLinear {
    /// Latent full-precision weights, shape (out, in).
    weight: Tensor,
    kind: WeightKind,
    eps: QuantEps,
}

impl BitLinear {
    /// A BitLinear of shape (out_dim, in_dim) named `{vb}.weight`, initialised N(0, std²).
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        kind: impl Into<LinearKind>,
        std: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let kind = kind.into();
        let weight = vb.get_with_hints(
            (out_dim, in_dim),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        )?;
        Ok(Self {
            weight,
            kind: kind.weights,
            eps: kind.eps,
        })
    }

    /// The latent weights (out, in).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Ternary or float.
    pub fn kind(&self) -> WeightKind {
        self.kind
    }

    /// How the quantisers guard their scales.
    pub fn quant_eps(&self) -> QuantEps {
        self.eps
    }

    /// The weights the forward pass multiplies by: γ·W̃ (through the STE) or the latent weights.
    pub fn effective_weight(&self) -> Result<Tensor> {
        match self.kind {
            WeightKind::Float => Ok(self.weight.clone()),
            WeightKind::Ternary
                if self.weight.device().is_cpu() && self.weight.dtype() == DType::F32 =>
            {
                self.weight
                    .contiguous()?
                    .apply_op1(FakeTernaryWeights(self.eps))
            }
            WeightKind::Ternary => {
                let (q, gamma) = ternary_quantize(&self.weight, self.eps)?;
                ste(&self.weight, &q.affine(gamma, 0.0)?)
            }
        }
    }
}

impl Module for BitLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = match self.kind {
            WeightKind::Float => x.clone(),
            WeightKind::Ternary => quantize_activations_ste(x, self.eps)?,
        };
        let w = self.effective_weight()?;
        // y = x̃ W̃ᵀ, flattening leading dims into one matmul.
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let y = super::precision::matmul(&x.reshape((rows, in_dim))?, &w.t()?)?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("non-empty") = w.dim(0)?;
        y.reshape(out_dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    /// The vectorisable RoundClip equals `round().clamp()` bit for bit: every tie, both sides of each, zeros,
    /// NaN, infinities, and a sweep of ordinary and huge values.
    #[test]
    fn round_clip_equals_round_then_clamp() {
        let mut ys = vec![
            0.0f32,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e30,
            -1e30,
            4194304.5,
        ];
        for i in -300..=300 {
            let tie = i as f32 + 0.5;
            ys.extend([
                tie,
                f32::from_bits(tie.to_bits() + 1),
                f32::from_bits(tie.to_bits() - 1),
                i as f32,
            ]);
        }
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ys.push(f32::from_bits(state as u32));
        }
        for (lo, hi) in [(-1.0, 1.0), (-128.0, 127.0), (-31.0, 31.0)] {
            for &y in &ys {
                let (want, got) = (y.round().clamp(lo, hi), round_clip(y, lo, hi));
                assert!(
                    want.to_bits() == got.to_bits() || (want.is_nan() && got.is_nan()),
                    "{y:e} in [{lo}, {hi}]: {want} vs {got}"
                );
            }
        }
    }

    #[test]
    fn quantized_weights_take_three_values() -> Result<()> {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = crate::model::init::seeded_var_builder(&varmap, 7, DType::F32, &dev);
        let lin = BitLinear::new(64, 32, WeightKind::Ternary, 0.02, vb.pp("lin"))?;
        let (q, gamma) = ternary_quantize(lin.weight(), lin.quant_eps())?;
        let mut values: Vec<f32> = q.flatten_all()?.to_vec1()?;
        values.sort_by(f32::total_cmp);
        values.dedup();
        assert_eq!(values, vec![-1.0, 0.0, 1.0]);
        assert!(gamma > 0.0);
        let w = lin.effective_weight()?;
        let mut eff: Vec<f32> = w.flatten_all()?.to_vec1()?;
        eff.sort_by(f32::total_cmp);
        eff.dedup_by(|a, b| (*a - *b).abs() < 1e-7);
        assert_eq!(eff.len(), 3, "effective weights {eff:?}");
        Ok(())
    }

    #[test]
    fn gradients_reach_latent_weights_through_ste() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::randn(0f32, 0.02, (16, 32), &dev)?;
        let lin = BitLinear {
            weight: w.as_tensor().clone(),
            kind: WeightKind::Ternary,
            eps: QuantEps::Clamp,
        };
        let x = Var::randn(0f32, 1.0, (3, 5, 32), &dev)?;
        let y = lin.forward(x.as_tensor())?;
        let loss = y.sqr()?.sum_all()?;
        let grads = loss.backward()?;
        for t in [w.as_tensor(), x.as_tensor()] {
            let g: Vec<f32> = grads.get(t).expect("gradient").flatten_all()?.to_vec1()?;
            assert!(g.iter().all(|v| v.is_finite()));
            assert!(g.iter().any(|v| *v != 0.0));
        }
        Ok(())
    }

    #[test]
    fn fused_activation_quantisation_matches_the_composed_one() -> Result<()> {
        let x = Var::randn(0f32, 2.0, (6, 33), &Device::Cpu)?;
        let fused = quantize_activations_ste(x.as_tensor(), QuantEps::Add)?;
        let composed = ste(
            x.as_tensor(),
            &quantize_activations(x.as_tensor(), QuantEps::Add)?,
        )?;
        let diff = (&fused - &composed)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "forward differs by {diff}");
        let g1 = (fused * 3.0)?.sum_all()?.backward()?;
        let g = g1
            .get(x.as_tensor())
            .expect("grad")
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert!(
            g.iter().all(|v| (*v - 3.0).abs() < 1e-6),
            "STE passes the gradient through"
        );
        Ok(())
    }

    #[test]
    fn activations_are_on_an_8bit_grid_per_token() -> Result<()> {
        let x = Tensor::new(&[[0.5f32, -1.0, 0.25], [10.0, 3.0, -7.0]], &Device::Cpu)?;
        let q = quantize_activations(&x, QuantEps::Add)?;
        let rows: Vec<Vec<f32>> = q.to_vec2()?;
        for (row, src) in rows.iter().zip([[0.5f32, -1.0, 0.25], [10.0, 3.0, -7.0]]) {
            let absmax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = (absmax + QUANT_EPS as f32) / 127.0;
            for (v, s) in row.iter().zip(src) {
                let level = v / scale;
                assert!((level - level.round()).abs() < 1e-3, "{v} not on the grid");
                assert!((v - s).abs() <= absmax / 127.0);
            }
        }
        Ok(())
    }

    #[test]
    fn fused_ternary_weights_match_quantize_and_pass_gradients_straight() -> Result<()> {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = crate::model::init::seeded_var_builder(&varmap, 7, DType::F32, &dev);
        let lin = BitLinear::new(48, 20, WeightKind::Ternary, 0.05, vb.pp("lin"))?;
        let (q, gamma) = ternary_quantize(lin.weight(), lin.quant_eps())?;
        let expected: Vec<f32> = q.affine(gamma, 0.0)?.flatten_all()?.to_vec1()?;
        let fused = lin.effective_weight()?;
        assert_eq!(fused.flatten_all()?.to_vec1::<f32>()?, expected);
        // The composed straight-through form gives the same gradient to the latent weights.
        let w = crate::model::init::seeded_randn(109, 0.0, 1.0, (20, 48), DType::F32, &dev)?;
        let g = (fused * &w)?.sum_all()?.backward()?;
        let got = g.get(lin.weight()).expect("gradient reaches W");
        let diff = (got - &w)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }
}
