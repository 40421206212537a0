//! What `--checkpoint` names: a run dir (its newest valid checkpoint), one checkpoint dir
//! (`RUN_DIR/checkpoints/step-N`), or a file written by `engine export`; and the tokenizer that goes with it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use tokenizers::Tokenizer;

use super::export;
use super::weights::{LinearMode, ModelWeights};
use crate::model::ModelConfig;
use crate::train::checkpoint::CheckpointDir;

enum Payload {
    /// Latent weights as trained.
    Checkpoint(HashMap<String, Tensor>),
    /// Already in inference form.
    Exported(ModelWeights),
}

/// A model and its tokenizer, loaded but not yet turned into an inference model.
pub struct Source {
    cfg: ModelConfig,
    payload: Payload,
    pub tokenizer: Tokenizer,
    /// The tokenizer's JSON text (for `export`).
    pub tokenizer_json: String,
    /// Where the model came from, for messages (`runs/a/checkpoints/step-00000040`).
    pub description: String,
    /// The context length it was trained with (the run's `config.toml`, or an export's metadata), when
    /// known: attention layers then attend to at most this many tokens when generating.
    pub context_len: Option<usize>,
}

/// `context_len` of a run dir's `config.toml`.
fn run_context_len(run_dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(run_dir.join("config.toml")).ok()?;
    let n = text
        .parse::<toml::Table>()
        .ok()?
        .get("context_len")?
        .as_integer()?;
    usize::try_from(n).ok().filter(|n| *n > 0)
}

/// The tokenizer of a run dir: `RUN_DIR/tokenizer.json`, else the one in the `data_dir` of its `config.toml`.
fn run_tokenizer(run_dir: &Path) -> Result<PathBuf> {
    let direct = run_dir.join("tokenizer.json");
    if direct.is_file() {
        return Ok(direct);
    }
    let cfg_path = run_dir.join("config.toml");
    let data_dir = std::fs::read_to_string(&cfg_path)
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .and_then(|t| t.get("data_dir")?.as_str().map(PathBuf::from));
    if let Some(p) = data_dir
        .map(|d| d.join("tokenizer.json"))
        .filter(|p| p.is_file())
    {
        return Ok(p);
    }
    bail!(
        "no tokenizer.json for this model: looked for {} and in the data_dir of {}",
        direct.display(),
        cfg_path.display()
    )
}

fn read_tokenizer_file(path: &Path) -> Result<(Tokenizer, String)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading tokenizer {}", path.display()))?;
    let tok = Tokenizer::from_bytes(text.as_bytes())
        .map_err(|e| anyhow::anyhow!("tokenizer {} does not load: {e}", path.display()))?;
    Ok((tok, text))
}

/// The vocab a tokenizer covers (largest id + 1, as `data_prep` records it).
fn check_vocab(tok: &Tokenizer, cfg: &ModelConfig, what: &str) -> Result<()> {
    let n = data_prep::tokenizer::vocab_size_of(tok);
    if n != cfg.vocab_size {
        bail!(
            "tokenizer {what} has a vocab of {n} but the model was trained with a vocab of {}: use the tokenizer of the data the model was trained on",
            cfg.vocab_size
        );
    }
    Ok(())
}

impl Source {
    /// Resolve and load `path` (see the module docs). Checkpoints are read and verified on the CPU.
    pub fn load(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!(
                "checkpoint {} does not exist: pass a run dir (`engine train --out`), a checkpoint dir (RUN_DIR/checkpoints/step-N) or a file from `engine export`",
                path.display()
            );
        }
        if path.is_file() {
            let ex = export::read(path)?;
            let tokenizer = Tokenizer::from_bytes(ex.tokenizer_json.as_bytes()).map_err(|e| {
                anyhow::anyhow!("the tokenizer inside {} does not load: {e}", path.display())
            })?;
            check_vocab(
                &tokenizer,
                &ex.weights.cfg,
                &format!("inside {}", path.display()),
            )?;
            return Ok(Self {
                cfg: ex.weights.cfg.clone(),
                payload: Payload::Exported(ex.weights),
                tokenizer,
                tokenizer_json: ex.tokenizer_json,
                description: path.display().to_string(),
                context_len: ex
                    .metadata
                    .get("context_len")
                    .and_then(|n| n.parse().ok())
                    .filter(|n| *n > 0),
            });
        }
        let (ck, run_dir) = if path.join("state.json").is_file() {
            let ck = CheckpointDir::load_from(path, &Device::Cpu)?;
            // RUN/checkpoints/step-N → RUN, also for a relative path such as `.` or `step-N`.
            let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
            let run_dir = path
                .parent()
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .unwrap_or_default();
            (ck, run_dir)
        } else {
            let ckpts = CheckpointDir::new(path);
            match ckpts.load_latest(&Device::Cpu)? {
                Some(ck) => (ck, path.to_path_buf()),
                None => bail!(
                    "{} has no valid checkpoint (looked in {}): train it first with `engine train`, or pass a checkpoint dir or a file from `engine export`",
                    path.display(),
                    ckpts.root().display()
                ),
            }
        };
        let tok_path = run_tokenizer(&run_dir)?;
        let (tokenizer, tokenizer_json) = read_tokenizer_file(&tok_path)?;
        check_vocab(
            &tokenizer,
            &ck.state.model_config,
            &tok_path.display().to_string(),
        )?;
        Ok(Self {
            cfg: ck.state.model_config.clone(),
            payload: Payload::Checkpoint(ck.model),
            tokenizer,
            tokenizer_json,
            description: format!("{} (step {})", ck.path.display(), ck.state.step),
            context_len: run_context_len(&run_dir),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The weights in inference form (ternary linears packed or dequantized, as `mode` says; an exported
    /// file is already packed and is returned as it is).
    pub fn into_weights(self, mode: LinearMode) -> Result<ModelWeights> {
        match self.payload {
            Payload::Checkpoint(t) => ModelWeights::from_tensors(&self.cfg, &t, mode),
            Payload::Exported(w) => Ok(w),
        }
    }

    /// Latent-weight tensors for the training model on `device` (the candle backend).
    pub fn latent_tensors(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        match &self.payload {
            Payload::Checkpoint(t) => t
                .iter()
                .map(|(k, v)| Ok((k.clone(), v.to_device(device)?)))
                .collect(),
            Payload::Exported(w) => w.latent_tensors(device),
        }
    }
}
