//! `engine export`: one self-contained file for generation — a safetensors file whose tensors are the packed
//! ternary linears (`NAME.packed`, U8, rows × row_bytes, the 2-bit layout of [`super::packed`]; `NAME.scale`,
//! F32 [1], γ) and every other tensor in F32 under its training name, and whose metadata holds the model
//! config (JSON), the tokenizer (`tokenizer.json` text) and a sha256 of all tensor data.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};

use super::float::FloatMatrix;
use super::packed::{packed_row_bytes, PackedTernary};
use super::weights::{dense_names, linear_names, Dense, Linear, ModelWeights};
use crate::model::ModelConfig;

/// `format` metadata value of an exported model.
pub const EXPORT_FORMAT: &str = "bitllama-packed";
/// `format_version` metadata value this engine writes and reads.
pub const EXPORT_VERSION: &str = "1";

/// An exported model read back.
pub struct Exported {
    pub weights: ModelWeights,
    pub tokenizer_json: String,
    pub metadata: HashMap<String, String>,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// sha256 over (name, data) of every tensor, in name order.
fn digest<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut h = Sha256::new();
    for (name, data) in tensors {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    }
    hex::encode(h.finalize())
}

/// Write `weights` (linears packed or float) and the tokenizer to `path` atomically; returns the file size.
pub fn write(
    path: &Path,
    weights: &ModelWeights,
    tokenizer_json: &str,
    source: &str,
    context_len: Option<usize>,
) -> Result<u64> {
    let mut tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (name, lin) in &weights.linears {
        match lin {
            Linear::Packed(p) => {
                let gamma = p.row_scales()[0];
                if p.row_scales().iter().any(|s| *s != gamma) {
                    bail!("{name}: a stacked matrix cannot be exported");
                }
                tensors.insert(
                    format!("{name}.packed"),
                    (Dtype::U8, vec![p.rows(), p.row_bytes()], p.codes().to_vec()),
                );
                tensors.insert(
                    format!("{name}.scale"),
                    (Dtype::F32, vec![1], f32_bytes(&[gamma])),
                );
            }
            Linear::FakeQuant(..) => bail!("{name}: export packs ternary linears; load it packed"),
            Linear::Float(f) => {
                tensors.insert(
                    name.clone(),
                    (Dtype::F32, vec![f.rows(), f.cols()], f32_bytes(f.data())),
                );
            }
        }
    }
    for (name, d) in &weights.dense {
        tensors.insert(
            name.clone(),
            (Dtype::F32, d.shape.clone(), f32_bytes(&d.data)),
        );
    }
    let mut meta = HashMap::from([
        ("format".to_string(), EXPORT_FORMAT.to_string()),
        ("format_version".to_string(), EXPORT_VERSION.to_string()),
        ("model_config".to_string(), serde_json::to_string(&weights.cfg)?),
        ("tokenizer".to_string(), tokenizer_json.to_string()),
        (
            "packing".to_string(),
            "2-bit codes w+1 per ternary weight; rows padded to 256; byte j of each 64-byte block holds \
             block columns j, j+64, j+128, j+192 in bits 7-6, 5-4, 3-2, 1-0; y = scale * (sum w*x)"
                .to_string(),
        ),
        (
            "data_sha256".to_string(),
            digest(tensors.iter().map(|(k, v)| (k.as_str(), v.2.as_slice()))),
        ),
        ("source".to_string(), source.to_string()),
    ]);
    if let Some(n) = context_len {
        // The trained context: `generate` keeps attention to this many tokens.
        meta.insert("context_len".to_string(), n.to_string());
    }
    let views = tensors
        .iter()
        .map(|(name, (dtype, shape, data))| {
            Ok((name.clone(), TensorView::new(*dtype, shape.clone(), data)?))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let bytes = sorted_metadata(safetensors::serialize(views, Some(meta))?)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::train::checkpoint::write_atomic(path, &bytes)?;
    Ok(bytes.len() as u64)
}

/// The same file with its `__metadata__` keys in sorted order: safetensors writes that map in a
/// `HashMap`'s per-process order, so two exports of one checkpoint would differ byte for byte. The header
/// keeps its length (the same JSON, reordered; padding as before), so the offsets stay valid.
fn sorted_metadata(mut bytes: Vec<u8>) -> Result<Vec<u8>> {
    let n = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    let header = &bytes[8..8 + n];
    let mut value: serde_json::Value = serde_json::from_slice(header)?;
    if let Some(meta) = value.get_mut("__metadata__") {
        let sorted: std::collections::BTreeMap<String, serde_json::Value> =
            serde_json::from_value(meta.take())?;
        *meta = serde_json::to_value(sorted)?;
    }
    let json = serde_json::to_vec(&value)?;
    let unpadded = header.len() - header.iter().rev().take_while(|b| **b == b' ').count();
    anyhow::ensure!(
        json.len() == unpadded,
        "re-ordering the export header changed its length ({} vs {unpadded})",
        json.len()
    );
    bytes[8..8 + json.len()].copy_from_slice(&json);
    Ok(bytes)
}

fn read_f32(st: &SafeTensors, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let t = st
        .tensor(name)
        .map_err(|_| anyhow::anyhow!("it has no tensor {name}"))?;
    if t.dtype() != Dtype::F32 || t.shape() != shape {
        bail!(
            "tensor {name} is {:?} {:?}, want F32 {shape:?}",
            t.dtype(),
            t.shape()
        );
    }
    Ok(t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Read an exported file, verifying its format, checksum and every tensor's shape.
pub fn read(path: &Path) -> Result<Exported> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    read_bytes(&bytes).with_context(|| {
        format!(
            "{} is not a valid model exported by `engine export`",
            path.display()
        )
    })
}

fn read_bytes(bytes: &[u8]) -> Result<Exported> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let field = |k: &str| {
        metadata
            .get(k)
            .with_context(|| format!("its metadata has no {k:?}"))
    };
    if field("format")? != EXPORT_FORMAT {
        bail!(
            "its format is {:?}, not {EXPORT_FORMAT:?}",
            field("format")?
        );
    }
    if field("format_version")? != EXPORT_VERSION {
        bail!(
            "it has format version {}, this engine reads {EXPORT_VERSION}",
            field("format_version")?
        );
    }
    let cfg: ModelConfig =
        serde_json::from_str(field("model_config")?).context("its model_config")?;
    cfg.validate()?;
    let tokenizer_json = field("tokenizer")?.clone();
    let mut all = st.tensors();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    if &digest(all.iter().map(|(k, v)| (k.as_str(), v.data()))) != field("data_sha256")? {
        bail!("its tensor data fails the sha256 check (corrupt or truncated)");
    }
    let mut linears = BTreeMap::new();
    for (name, rows, cols) in linear_names(&cfg) {
        let lin = if let Ok(p) = st.tensor(&format!("{name}.packed")) {
            let rb = packed_row_bytes(cols);
            if p.dtype() != Dtype::U8 || p.shape() != [rows, rb] {
                bail!(
                    "tensor {name}.packed is {:?} {:?}, want U8 [{rows}, {rb}]",
                    p.dtype(),
                    p.shape()
                );
            }
            let gamma = read_f32(&st, &format!("{name}.scale"), &[1])?[0];
            Linear::Packed(
                PackedTernary::from_codes(p.data().to_vec(), rows, cols, gamma)
                    .map_err(|e| anyhow::anyhow!("{name}: {e}"))?
                    .with_eps(cfg.quant_eps),
            )
        } else {
            Linear::Float(FloatMatrix::new(
                read_f32(&st, &name, &[rows, cols])?,
                rows,
                cols,
            ))
        };
        linears.insert(name, lin);
    }
    let mut dense = BTreeMap::new();
    for (name, shape) in dense_names(&cfg) {
        let data = read_f32(&st, &name, &shape)?;
        dense.insert(name, Dense { shape, data });
    }
    Ok(Exported {
        weights: ModelWeights {
            cfg,
            linears,
            dense,
        },
        tokenizer_json,
        metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::super::weights::LinearMode;
    use super::*;
    use crate::model::{build_seeded, MixerKind, WeightKind};
    use candle_core::{DType, Device};

    #[test]
    fn export_roundtrip_and_corruption_is_caught() -> Result<()> {
        let dir = tempfile::tempdir()?;
        for (mixer, weights) in [
            (MixerKind::Ttt, WeightKind::Ternary),
            (MixerKind::Attention, WeightKind::Float),
        ] {
            let cfg = ModelConfig {
                vocab_size: 40,
                dim: 16,
                n_layers: 2,
                n_heads: 2,
                mixer,
                weights,
                mlp_hidden: Some(40),
                ttt_mini_batch: 4,
                ttt_base_lr: 1.0,
                tie_embeddings: false,
                ..Default::default()
            };
            let (vm, _) = build_seeded(&cfg, 1, DType::F32, &Device::Cpu)?;
            let tensors = vm
                .data()
                .lock()
                .expect("lock")
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                .collect();
            let w = ModelWeights::from_tensors(&cfg, &tensors, LinearMode::Packed)?;
            let path = dir.path().join(format!("{mixer}.safetensors"));
            write(&path, &w, "{\"tok\": 1}", "test", Some(64))?;
            let back = read(&path)?;
            assert_eq!(back.weights.cfg, cfg);
            assert_eq!(back.weights.linears, w.linears);
            assert_eq!(back.weights.dense, w.dense);
            assert_eq!(back.tokenizer_json, "{\"tok\": 1}");
            // Flip one byte of tensor data near the end: the checksum catches it.
            let mut bytes = std::fs::read(&path)?;
            let n = bytes.len();
            bytes[n - 3] ^= 0x40;
            std::fs::write(&path, &bytes)?;
            let err = format!("{:#}", read(&path).err().expect("corrupt file refused"));
            assert!(err.contains("sha256"), "{err}");
            // Truncated / not a safetensors file.
            std::fs::write(&path, &bytes[..n / 2])?;
            assert!(read(&path).is_err());
            std::fs::write(&path, b"hello")?;
            let err = format!("{:#}", read(&path).err().expect("garbage refused"));
            assert!(err.contains("not a valid model"), "{err}");
        }
        Ok(())
    }
}
