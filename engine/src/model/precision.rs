//! Mixed precision, as PyTorch's autocast: inside an [`Autocast`] scope the large matmuls (BitLinear,
//! attention scores and mixing, the output head) take their inputs in a lower-precision dtype (bf16 on CUDA,
//! where tensor cores make it several times faster) and return f32; weights, gradients of the weights,
//! optimizer state, norms, softmax, the TTT inner loop and the loss stay f32. Thread-local: the training
//! thread sets it; nothing else is affected.
//!
//! BitLinear inputs lose nothing in bf16: ternary weights and int8-valued activations are exact there; only
//! the product's rounding to bf16 (8 significant bits) differs from f32.

use std::cell::Cell;

use candle_core::{DType, Result, Tensor};

thread_local! {
    static MATMUL_DTYPE: Cell<DType> = const { Cell::new(DType::F32) };
}

/// While alive, [`matmul`] on this thread computes in `dtype`; the previous setting returns on drop.
#[must_use = "autocast ends when the guard is dropped"]
pub struct Autocast {
    prev: DType,
}

impl Autocast {
    pub fn new(dtype: DType) -> Self {
        Self {
            prev: MATMUL_DTYPE.with(|d| d.replace(dtype)),
        }
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        MATMUL_DTYPE.with(|d| d.set(self.prev));
    }
}

/// The dtype matmuls compute in on this thread.
pub fn matmul_dtype() -> DType {
    MATMUL_DTYPE.with(Cell::get)
}

/// a · b, computed in the autocast dtype, returned in a's dtype (gradients flow through both casts).
/// Outside autocast (the f32 default) it is plain `a.matmul(b)` in whatever dtype a and b have.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let d = matmul_dtype();
    if d == DType::F32 || (d == a.dtype() && d == b.dtype()) {
        return a.matmul(b);
    }
    a.to_dtype(d)?.matmul(&b.to_dtype(d)?)?.to_dtype(a.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn autocast_computes_in_the_lower_dtype_and_backpropagates() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&crate::model::init::seeded_randn(
            107,
            0.0,
            1.0,
            (8, 16),
            DType::F32,
            &dev,
        )?)?;
        let b = Var::from_tensor(&crate::model::init::seeded_randn(
            108,
            0.0,
            1.0,
            (16, 4),
            DType::F32,
            &dev,
        )?)?;
        let exact = a.matmul(&b)?;
        let g_exact = exact.sum_all()?.backward()?;
        // f16 stands in for bf16 here: candle's CPU backend has no bf16 matmul.
        let (half, g_half) = {
            let _cast = Autocast::new(DType::F16);
            assert_eq!(matmul_dtype(), DType::F16);
            let y = matmul(&a, &b)?;
            let g = y.sum_all()?.backward()?;
            (y, g)
        };
        assert_eq!(matmul_dtype(), DType::F32, "the guard restores f32");
        assert_eq!(half.dtype(), DType::F32);
        let rel = |x: &Tensor, y: &Tensor| -> Result<f32> {
            let d = (x - y)?.abs()?.max_all()?.to_scalar::<f32>()?;
            Ok(d / y.abs()?.max_all()?.to_scalar::<f32>()?)
        };
        let r = rel(&half, &exact)?;
        assert!(r > 0.0 && r < 5e-3, "forward rel diff {r}");
        for v in [&a, &b] {
            let (gh, ge) = (g_half.get(v).unwrap(), g_exact.get(v).unwrap());
            assert_eq!(gh.dtype(), DType::F32);
            let r = rel(gh, ge)?;
            assert!(r < 5e-3, "grad rel diff {r}");
        }
        Ok(())
    }
}
