//! Gated activations act(a) ⊙ b: SwiGLU's silu(W_gate x) ⊙ W_up x and the Mamba backbone's
//! GELU(θ_G x) ⊙ y. On CPU in f32 each is one fused op forward and one backward (candle's silu and GELU
//! backwards make ten to fifteen full-size temporaries); elsewhere candle's ops.

use std::marker::PhantomData;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu_f32;

/// An activation with what the fused gate needs: its value, the gradients of act(a)·b, and candle's form.
pub trait Activation: Send + Sync + 'static {
    const NAME: &'static str;
    fn value(a: f32) -> f32;
    /// (∂/∂a, ∂/∂b) of g · act(a) · b.
    fn grads(a: f32, b: f32, g: f32) -> (f32, f32);
    fn composed(a: &Tensor) -> Result<Tensor>;
}

/// silu(a) = a·σ(a).
pub struct Silu;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl Activation for Silu {
    const NAME: &'static str = "silu gate";

    fn value(a: f32) -> f32 {
        a * sigmoid(a)
    }

    // ∂a = g · b · σ(a)(1 + a(1 − σ(a)));  ∂b = g · silu(a)
    fn grads(a: f32, b: f32, g: f32) -> (f32, f32) {
        let s = sigmoid(a);
        (g * b * s * (1.0 + a * (1.0 - s)), g * a * s)
    }

    fn composed(a: &Tensor) -> Result<Tensor> {
        a.silu()
    }
}

/// GELU, tanh form (the authors' gate; candle's `gelu`).
pub struct Gelu;

const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;

/// GELU, tanh form, bit for bit as candle's `gelu` (the inference path uses it too).
#[inline(always)]
pub(crate) fn gelu(v: f32) -> f32 {
    0.5 * v * (1.0 + f32::tanh(SQRT_TWO_OVER_PI * v * (1.0 + 0.044715 * v * v)))
}

impl Activation for Gelu {
    const NAME: &'static str = "gelu gate";

    fn value(a: f32) -> f32 {
        gelu(a)
    }

    // With u = √(2/π)(a + 0.044715 a³): GELU'(a) = ½(1 + tanh u) + ½ a (1 − tanh² u) √(2/π)(1 + 3·0.044715 a²).
    fn grads(a: f32, b: f32, g: f32) -> (f32, f32) {
        let th = f32::tanh(SQRT_TWO_OVER_PI * a * (1.0 + 0.044715 * a * a));
        let slope = 0.5 * (1.0 + th)
            + 0.5 * a * (1.0 - th * th) * SQRT_TWO_OVER_PI * (1.0 + 3.0 * 0.044715 * a * a);
        (g * b * slope, g * (0.5 * a * (1.0 + th)))
    }

    fn composed(a: &Tensor) -> Result<Tensor> {
        a.gelu()
    }
}

/// act(a) ⊙ b.
pub fn gate<A: Activation>(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.device().is_cpu() && a.dtype() == DType::F32 && b.dtype() == DType::F32 {
        return a
            .contiguous()?
            .apply_op2(&b.contiguous()?, FusedGate::<A>(PhantomData));
    }
    A::composed(a)? * b
}

/// Elements per parallel task.
const CHUNK: usize = 1 << 13;

struct FusedGate<A>(PhantomData<A>);

impl<A: Activation> CustomOp2 for FusedGate<A> {
    fn name(&self) -> &'static str {
        A::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (
            cpu_f32::slice(s1, l1, A::NAME)?,
            cpu_f32::slice(s2, l2, A::NAME)?,
        );
        if l1.dims() != l2.dims() {
            candle_core::bail!("{}: {:?} against {:?}", A::NAME, l1.dims(), l2.dims());
        }
        let mut out = vec![0f32; a.len()];
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| {
                for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                    *o = A::value(a) * b;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (shape, dev) = (a.shape().clone(), a.device().clone());
        let (a, b, g) = (cpu_f32::view(a), cpu_f32::view(b), cpu_f32::view(&grad));
        let (a, b, g) = (a.slice(A::NAME)?, b.slice(A::NAME)?, g.slice(A::NAME)?);
        let (mut da, mut db) = (vec![0f32; a.len()], vec![0f32; a.len()]);
        da.par_chunks_mut(CHUNK)
            .zip(db.par_chunks_mut(CHUNK))
            .zip(
                a.par_chunks(CHUNK)
                    .zip(b.par_chunks(CHUNK))
                    .zip(g.par_chunks(CHUNK)),
            )
            .for_each(|((da, db), ((a, b), g))| {
                for i in 0..a.len() {
                    (da[i], db[i]) = A::grads(a[i], b[i], g[i]);
                }
            });
        Ok((
            Some(Tensor::from_vec(da, shape.clone(), &dev)?),
            Some(Tensor::from_vec(db, shape, &dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_gate_matches_composed_value_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::randn(0f32, 3.0, (2, 9, 40), &dev)?;
        let b = Var::randn(0f32, 1.0, (2, 9, 40), &dev)?;
        let fused = gate::<Silu>(a.as_tensor(), b.as_tensor())?;
        let composed = (a.as_tensor().silu()? * b.as_tensor())?;
        let diff = (&fused - &composed)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "forward differs by {diff}");
        let w = crate::model::init::seeded_randn(101, 0.0, 1.0, (2, 9, 40), DType::F32, &dev)?;
        let ga = (fused * &w)?.sum_all()?.backward()?;
        let gb = (composed * &w)?.sum_all()?.backward()?;
        for v in [&a, &b] {
            let (x, y) = (
                ga.get(v.as_tensor()).unwrap(),
                gb.get(v.as_tensor()).unwrap(),
            );
            let diff = (x - y)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "gradients differ by {diff}");
        }
        Ok(())
    }
}
