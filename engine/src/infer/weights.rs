//! `ModelWeights`: every tensor of a Bit-Llama model by its training name, in the form inference uses —
//! block linears packed (ternary models) or dense f32, everything else dense f32. Built from a checkpoint's
//! tensors or read from an exported file; what `engine export` writes.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::float::FloatMatrix;
use super::packed::{fake_quantize, PackedTernary};
use crate::model::{MixerKind, ModelConfig, QuantEps, WeightKind};

/// A block linear (y = W x, W: out × in).
#[derive(Debug, Clone, PartialEq)]
pub enum Linear {
    /// Ternary weights at 2 bits each, integer kernels.
    Packed(PackedTernary),
    /// Dense f32 weights (a `weights = "float"` model).
    Float(FloatMatrix),
    /// A ternary linear held as γ·W̃ in f32 and multiplied in f32 with fake-quantized (int8-grid) activations:
    /// the same function as [`Linear::Packed`], computed as a float engine would.
    FakeQuant(FloatMatrix, QuantEps),
}

impl Linear {
    pub fn rows(&self) -> usize {
        match self {
            Linear::Packed(p) => p.rows(),
            Linear::Float(f) | Linear::FakeQuant(f, _) => f.rows(),
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Linear::Packed(p) => p.cols(),
            Linear::Float(f) | Linear::FakeQuant(f, _) => f.cols(),
        }
    }

    /// Bytes of weights held in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Linear::Packed(p) => p.bytes(),
            Linear::Float(f) | Linear::FakeQuant(f, _) => f.bytes(),
        }
    }

    /// y (t × rows) = W x for x (t × cols).
    pub fn forward(&self, x: &[f32], t: usize) -> Vec<f32> {
        let mut out = vec![0f32; t * self.rows()];
        match self {
            Linear::Packed(p) => p.forward(x, t, &mut out),
            Linear::Float(f) => f.forward(x, t, &mut out),
            Linear::FakeQuant(f, eps) => f.forward(&fake_quantize(x, f.cols(), *eps), t, &mut out),
        }
        out
    }

    /// Stack the rows of linears of the same kind and input size (they then share one activation
    /// quantisation and one parallel dispatch).
    pub fn stack(parts: Vec<Linear>) -> Linear {
        if parts.len() == 1 {
            return parts.into_iter().next().expect("one part");
        }
        let mut packed = Vec::new();
        let mut float = Vec::new();
        let mut fake = Vec::new();
        let mut fake_eps = None;
        for l in parts {
            match l {
                Linear::Packed(p) => packed.push(p),
                Linear::Float(f) => float.push(f),
                Linear::FakeQuant(f, eps) => {
                    assert!(
                        fake_eps.is_none_or(|e| e == eps),
                        "stacking different guards"
                    );
                    fake_eps = Some(eps);
                    fake.push(f)
                }
            }
        }
        match (packed.is_empty(), float.is_empty(), fake.is_empty()) {
            (false, true, true) => Linear::Packed(PackedTernary::stack(&packed)),
            (true, false, true) => Linear::Float(FloatMatrix::stack(&float)),
            (true, true, false) => Linear::FakeQuant(
                FloatMatrix::stack(&fake),
                fake_eps.expect("at least one part"),
            ),
            _ => panic!("stacking linears of different kinds"),
        }
    }
}

/// How the ternary linears of a checkpoint are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearMode {
    /// 2-bit packed codes + γ (the fast path).
    Packed,
    /// γ·W̃ as dense f32 with fake-quantized activations (the same function, as a float engine computes it).
    Dequantized,
}

/// A dense tensor: shape and row-major f32 values.
#[derive(Debug, Clone, PartialEq)]
pub struct Dense {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Every tensor of a model, ready for inference.
#[derive(Debug, Clone)]
pub struct ModelWeights {
    pub cfg: ModelConfig,
    /// Block linears by their training name (`blocks.0.mixer.q.weight`, …).
    pub linears: BTreeMap<String, Linear>,
    /// Everything else by training name (`embed.weight`, `blocks.0.norm1.weight`, …).
    pub dense: BTreeMap<String, Dense>,
}

/// Names and shapes (out, in) of the block linears of `cfg`.
pub fn linear_names(cfg: &ModelConfig) -> Vec<(String, usize, usize)> {
    let (d, h) = (cfg.dim, cfg.mlp_hidden());
    let mut v = Vec::new();
    let mixer: &[&str] = if cfg.mamba() {
        &["q", "v", "o", "gate"]
    } else {
        &["q", "k", "v", "o"]
    };
    for i in 0..cfg.n_layers {
        for p in mixer {
            v.push((format!("blocks.{i}.mixer.{p}.weight"), d, d));
        }
        v.push((format!("blocks.{i}.mlp.gate.weight"), h, d));
        v.push((format!("blocks.{i}.mlp.up.weight"), h, d));
        v.push((format!("blocks.{i}.mlp.down.weight"), d, h));
    }
    v
}

/// Names and shapes of every other tensor of `cfg`.
pub fn dense_names(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (v, d, nh, hd) = (cfg.vocab_size, cfg.dim, cfg.n_heads, cfg.head_dim());
    let mut out = vec![("embed.weight".to_string(), vec![v, d])];
    for i in 0..cfg.n_layers {
        out.push((format!("blocks.{i}.norm1.weight"), vec![d]));
        out.push((format!("blocks.{i}.norm2.weight"), vec![d]));
        if cfg.mixer == MixerKind::Ttt {
            out.push((format!("blocks.{i}.mixer.lr.weight"), vec![nh, d]));
            out.push((format!("blocks.{i}.mixer.w0"), vec![nh, hd, hd]));
            out.push((format!("blocks.{i}.mixer.b0"), vec![nh, 1, hd]));
            out.push((format!("blocks.{i}.mixer.ln.weight"), vec![nh, 1, hd]));
            out.push((format!("blocks.{i}.mixer.ln.bias"), vec![nh, 1, hd]));
            if cfg.ttt_lr_bias {
                out.push((format!("blocks.{i}.mixer.lr.bias"), vec![nh]));
            }
            if cfg.ttt_token_eta == crate::model::TokenEta::Index {
                out.push((
                    format!("blocks.{i}.mixer.token_eta.offset"),
                    vec![cfg.ttt_mini_batch],
                ));
            }
            if cfg.ttt_post_norm {
                out.push((format!("blocks.{i}.mixer.post_norm.weight"), vec![d]));
                out.push((format!("blocks.{i}.mixer.post_norm.bias"), vec![d]));
            }
            if cfg.mamba() {
                let k = cfg.ttt_conv_kernel;
                for c in ["mixer.conv_q", "mixer.conv_k", "pre_conv.conv"] {
                    out.push((format!("blocks.{i}.{c}.weight"), vec![d, k]));
                    out.push((format!("blocks.{i}.{c}.bias"), vec![d]));
                }
                out.push((format!("blocks.{i}.pre_conv.norm.weight"), vec![d]));
            }
        }
    }
    out.push(("norm.weight".to_string(), vec![d]));
    if !cfg.tie_embeddings {
        out.push(("head.weight".to_string(), vec![v, d]));
    }
    out
}

fn get<'a>(map: &'a HashMap<String, Tensor>, name: &str, shape: &[usize]) -> Result<&'a Tensor> {
    let t = map
        .get(name)
        .with_context(|| format!("the checkpoint has no tensor {name}"))?;
    if t.dims() != shape {
        bail!(
            "tensor {name} has shape {:?} but the model config wants {shape:?}",
            t.dims()
        );
    }
    Ok(t)
}

impl ModelWeights {
    /// From a checkpoint's tensors (latent weights, as trained): ternary linears are quantized once, exactly
    /// as the training forward pass does, and packed (or dequantized to f32).
    pub fn from_tensors(
        cfg: &ModelConfig,
        tensors: &HashMap<String, Tensor>,
        mode: LinearMode,
    ) -> Result<Self> {
        cfg.validate()?;
        let mut linears = BTreeMap::new();
        for (name, rows, cols) in linear_names(cfg) {
            let t = get(tensors, &name, &[rows, cols])?
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?;
            let lin = match (cfg.weights, mode) {
                (WeightKind::Float, _) => {
                    Linear::Float(FloatMatrix::new(t.flatten_all()?.to_vec1()?, rows, cols))
                }
                (WeightKind::Ternary, LinearMode::Packed) => {
                    Linear::Packed(PackedTernary::from_weight(&t, cfg.quant_eps)?)
                }
                (WeightKind::Ternary, LinearMode::Dequantized) => {
                    let p = PackedTernary::from_weight(&t, cfg.quant_eps)?;
                    Linear::FakeQuant(FloatMatrix::new(p.dequantized(), rows, cols), cfg.quant_eps)
                }
            };
            linears.insert(name, lin);
        }
        let mut dense = BTreeMap::new();
        for (name, shape) in dense_names(cfg) {
            let t = get(tensors, &name, &shape)?;
            let data = t
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            dense.insert(name, Dense { shape, data });
        }
        Ok(Self {
            cfg: cfg.clone(),
            linears,
            dense,
        })
    }

    /// Bytes of the block linears and of all weights, as held in memory.
    pub fn bytes(&self) -> (usize, usize) {
        let lin: usize = self.linears.values().map(Linear::bytes).sum();
        let dense: usize = self.dense.values().map(|d| 4 * d.data.len()).sum();
        (lin, lin + dense)
    }

    /// Latent-weight tensors that make the training model (`BitLlama`) compute the same function, for the
    /// candle backend (e.g. on CUDA). A packed matrix W̃ with scale γ becomes W̃·γ/f (f = fraction of
    /// non-zero weights): its absmean is γ again, and it quantizes back to W̃ exactly.
    pub fn latent_tensors(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, lin) in &self.linears {
            let (rows, cols) = (lin.rows(), lin.cols());
            let data = match lin {
                Linear::Float(f) => f.data().to_vec(),
                Linear::FakeQuant(f, _) => {
                    let mut v = f.data().to_vec();
                    let nz = v.iter().filter(|x| **x != 0.0).count().max(1);
                    let c = v.len() as f32 / nz as f32;
                    v.iter_mut().for_each(|x| *x *= c);
                    v
                }
                Linear::Packed(p) => {
                    let mut v = p.ternary_values();
                    let nz = v.iter().filter(|x| **x != 0.0).count().max(1);
                    let c = p.row_scales()[0] * v.len() as f32 / nz as f32;
                    v.iter_mut().for_each(|x| *x *= c);
                    v
                }
            };
            out.insert(name.clone(), Tensor::from_vec(data, (rows, cols), device)?);
        }
        for (name, d) in &self.dense {
            out.insert(
                name.clone(),
                Tensor::from_vec(d.data.clone(), d.shape.as_slice(), device)?,
            );
        }
        Ok(out)
    }

    pub(crate) fn take_linear(&mut self, name: &str) -> Result<Linear> {
        self.linears
            .remove(name)
            .with_context(|| format!("no linear {name}"))
    }

    pub(crate) fn take_dense(&mut self, name: &str) -> Result<Vec<f32>> {
        self.dense
            .remove(name)
            .map(|d| d.data)
            .with_context(|| format!("no tensor {name}"))
    }
}
