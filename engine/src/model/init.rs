//! Seeded parameter initialisation. candle's CPU RNG cannot be seeded, so parameters are drawn here from a
//! ChaCha stream keyed by (seed, parameter name): the same seed gives the same model on every machine,
//! whatever order the layers are built in.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{BitLlama, ModelConfig};

/// A `VarMap` backend whose new variables are initialised from a seeded RNG.
struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

/// FNV-1a, to key each parameter's stream by its name.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn draw(shape: &Shape, init: Init, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let n = shape.elem_count();
    match init {
        Init::Const(v) => vec![v; n],
        Init::Randn { mean, stdev } => (0..n)
            .map(|_| {
                // Box–Muller.
                let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
                let u2: f64 = rng.gen();
                mean + stdev * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
            })
            .collect(),
        Init::Uniform { lo, up } => (0..n).map(|_| rng.gen_range(lo..up)).collect(),
        Init::Kaiming { .. } => {
            // Not used by this model; fall back to a small normal.
            draw(
                shape,
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
                rng,
            )
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self.varmap.data().lock().expect("varmap lock poisoned");
        if let Some(var) = data.get(name) {
            if var.shape() != &s {
                candle_core::bail!(
                    "parameter {name} exists with shape {:?}, wanted {s:?}",
                    var.shape()
                );
            }
            return Ok(var.as_tensor().clone());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ name_hash(name));
        let values = draw(&s, h, &mut rng);
        let tensor = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&tensor)?;
        let t = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("parameter {name} must be created with a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .expect("varmap lock poisoned")
            .contains_key(name)
    }
}

/// Build a model whose parameters are drawn from `seed`; returns the `VarMap` holding them (for the
/// optimizer and checkpoints) and the model.
pub fn build_seeded(
    cfg: &ModelConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<(VarMap, BitLlama)> {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, seed, dtype, device);
    let model = BitLlama::new(cfg, vb)?;
    Ok((varmap, model))
}

/// A `VarBuilder` over `varmap` whose new parameters are drawn from `seed`: single layers built the way
/// [`build_seeded`] builds the model (tests use it so that they see the same weights on every run).
pub fn seeded_var_builder(
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let backend = SeededVarMap {
        varmap: varmap.clone(),
        seed,
    };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}

/// Normal draws from a seeded stream (candle's CPU `randn` cannot be seeded).
pub fn seeded_randn(
    seed: u64,
    mean: f64,
    stdev: f64,
    shape: impl Into<Shape>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let shape = shape.into();
    let values = draw(
        &shape,
        Init::Randn { mean, stdev },
        &mut ChaCha8Rng::seed_from_u64(seed),
    );
    Tensor::from_vec(values, shape, device)?.to_dtype(dtype)
}

/// Tests: move the parameters that start at a constant and only matter once they leave it (token-η offsets,
/// θ_lr bias, post-norm) off it, with seeded noise, so that a test sees each of them used.
#[cfg(test)]
pub(crate) fn perturb_constant_inits(varmap: &VarMap) -> Result<()> {
    for (name, var) in varmap.data().lock().expect("varmap lock poisoned").iter() {
        if ["token_eta", "lr.bias", "post_norm"]
            .iter()
            .any(|p| name.contains(p))
        {
            let (dtype, dev) = (var.dtype(), var.device().clone());
            let noise = seeded_randn(name.len() as u64, 0.0, 0.3, var.shape(), dtype, &dev)?;
            var.set(&(var.as_tensor() + noise)?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_parameters() -> Result<()> {
        let cfg = ModelConfig {
            vocab_size: 50,
            dim: 16,
            n_heads: 2,
            n_layers: 1,
            ..Default::default()
        };
        let dev = Device::Cpu;
        let (a, _) = build_seeded(&cfg, 7, DType::F32, &dev)?;
        let (b, _) = build_seeded(&cfg, 7, DType::F32, &dev)?;
        let (c, _) = build_seeded(&cfg, 8, DType::F32, &dev)?;
        let get = |m: &VarMap| -> Result<Vec<f32>> {
            m.data().lock().expect("lock")["embed.weight"]
                .as_tensor()
                .flatten_all()?
                .to_vec1()
        };
        assert_eq!(get(&a)?, get(&b)?);
        assert_ne!(get(&a)?, get(&c)?);
        let std = {
            let v = get(&a)?;
            (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt()
        };
        assert!((std - 0.02).abs() < 0.003, "embedding std {std}");
        Ok(())
    }
}
