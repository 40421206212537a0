//! SwiGLU feed-forward (Shazeer 2020): FFN(x) = W_down (silu(W_gate x) ⊙ W_up x).
//!
//! On CPU in f32 the gate silu(a) ⊙ b is one fused op forward and one backward (candle's silu backward
//! alone makes about ten full-size temporaries).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::cpu_f32;

use super::bit_linear::{BitLinear, LinearKind};

#[derive(Debug, Clone)]
pub struct SwiGlu {
    gate: BitLinear,
    up: BitLinear,
    down: BitLinear,
}

impl SwiGlu {
    pub fn new(
        dim: usize,
        hidden: usize,
        kind: impl Into<LinearKind>,
        std: f64,
        out_std: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let kind = kind.into();
        Ok(Self {
            gate: BitLinear::new(dim, hidden, kind, std, vb.pp("gate"))?,
            up: BitLinear::new(dim, hidden, kind, std, vb.pp("up"))?,
            down: BitLinear::new(hidden, dim, kind, out_std, vb.pp("down"))?,
        })
    }
}

impl Module for SwiGlu {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (a, b) = (self.gate.forward(x)?, self.up.forward(x)?);
        self.down.forward(&silu_gate(&a, &b)?)
    }
}

/// silu(a) ⊙ b.
pub fn silu_gate(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.device().is_cpu() && a.dtype() == DType::F32 && b.dtype() == DType::F32 {
        return a.contiguous()?.apply_op2(&b.contiguous()?, SiluGate);
    }
    a.silu()? * b
}

/// Elements per parallel task.
const CHUNK: usize = 1 << 13;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

const OP: &str = "silu gate";

struct SiluGate;

impl CustomOp2 for SiluGate {
    fn name(&self) -> &'static str {
        "silu-gate"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (cpu_f32::slice(s1, l1, OP)?, cpu_f32::slice(s2, l2, OP)?);
        if l1.dims() != l2.dims() {
            candle_core::bail!("silu gate: {:?} against {:?}", l1.dims(), l2.dims());
        }
        let mut out = vec![0f32; a.len()];
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| {
                for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                    *o = a * sigmoid(a) * b;
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
        let (a, b, g) = (a.slice(OP)?, b.slice(OP)?, g.slice(OP)?);
        // ∂a = g · b · σ(a)(1 + a(1 − σ(a)));  ∂b = g · silu(a)
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
                    let s = sigmoid(a[i]);
                    da[i] = g[i] * b[i] * s * (1.0 + a[i] * (1.0 - s));
                    db[i] = g[i] * a[i] * s;
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
        let fused = silu_gate(a.as_tensor(), b.as_tensor())?;
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
