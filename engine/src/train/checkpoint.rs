//! `CheckpointDir`: atomic, verified checkpoints under `RUN_DIR/checkpoints/`.
//!
//! A checkpoint is a folder `step-NNNNNNNN/` with `model.safetensors`, `optimizer.safetensors` and
//! `state.json` (step, RNG position, tokens seen, config hash, sha256 of both tensor files). It is written
//! under `.tmp-step-NNNNNNNN/`, every file fsynced, renamed into place, the parent fsynced, and only then is
//! the `latest` pointer replaced (temp file + rename). A crash at any instant leaves the previous checkpoint
//! usable; a checkpoint whose files fail their sha256 is skipped with a warning on load.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::ModelConfig;

/// Version of the checkpoint layout.
pub const CHECKPOINT_FORMAT: u32 = 1;

/// `state.json` of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointState {
    pub format_version: u32,
    pub step: u64,
    pub tokens: u64,
    /// Training seconds before this checkpoint (for `max_seconds` runs).
    pub elapsed_s: f64,
    /// Seed and word position of the data-sampling ChaCha RNG (u128 as a decimal string).
    pub rng_seed: u64,
    pub rng_word_pos: String,
    /// sha256 of the model config (JSON): a checkpoint only loads into the same architecture.
    pub config_hash: String,
    pub model_config: ModelConfig,
    pub world_size: usize,
    pub model_sha256: String,
    pub optimizer_sha256: String,
    pub last_val_loss: Option<f64>,
}

/// A checkpoint read back from disk.
pub struct LoadedCheckpoint {
    pub path: PathBuf,
    pub state: CheckpointState,
    pub model: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
}

/// Hash of a model config, stored in checkpoints.
pub fn config_hash(cfg: &ModelConfig) -> String {
    hex::encode(Sha256::digest(
        serde_json::to_vec(cfg).expect("config serialises"),
    ))
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn fsync_path(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("fsync {}", path.display()))
}

/// Write `bytes` to `path` atomically: temp file, fsync, rename, fsync the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    {
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    fsync_path(dir)
}

/// The checkpoints of one run.
pub struct CheckpointDir {
    root: PathBuf,
}

fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

impl CheckpointDir {
    pub fn new(run_dir: &Path) -> Self {
        Self {
            root: run_dir.join("checkpoints"),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Steps of the complete checkpoint folders, newest first.
    pub fn steps(&self) -> Vec<u64> {
        let mut steps: Vec<u64> = fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
            .collect();
        steps.sort_unstable_by(|a, b| b.cmp(a));
        steps
    }

    /// Whether the run has any checkpoint folder.
    pub fn any(&self) -> bool {
        !self.steps().is_empty()
    }

    /// Write a checkpoint for `state.step`; returns its path and size in bytes. Keeps the newest `keep`.
    pub fn save(
        &self,
        mut state: CheckpointState,
        model: &HashMap<String, Tensor>,
        optimizer: &HashMap<String, Tensor>,
        keep: usize,
    ) -> Result<(PathBuf, u64)> {
        fs::create_dir_all(&self.root)
            .with_context(|| format!("creating {}", self.root.display()))?;
        let name = step_name(state.step);
        let tmp = self.root.join(format!(".tmp-{name}"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir(&tmp)?;
        let model_path = tmp.join("model.safetensors");
        let opt_path = tmp.join("optimizer.safetensors");
        candle_core::safetensors::save(model, &model_path).context("writing model.safetensors")?;
        candle_core::safetensors::save(optimizer, &opt_path)
            .context("writing optimizer.safetensors")?;
        fsync_path(&model_path)?;
        fsync_path(&opt_path)?;
        state.model_sha256 = sha256_file(&model_path)?;
        state.optimizer_sha256 = sha256_file(&opt_path)?;
        let state_path = tmp.join("state.json");
        {
            let mut f = File::create(&state_path)?;
            f.write_all(serde_json::to_string_pretty(&state)?.as_bytes())?;
            f.sync_all()?;
        }
        fsync_path(&tmp)?;
        let dst = self.root.join(&name);
        if dst.exists() {
            // Re-saving the same step (e.g. the final checkpoint after a periodic one): replace it.
            fs::remove_dir_all(&dst)?;
        }
        fs::rename(&tmp, &dst).with_context(|| format!("renaming {} into place", tmp.display()))?;
        fsync_path(&self.root)?;
        write_atomic(&self.root.join("latest"), name.as_bytes())?;
        let bytes = ["model.safetensors", "optimizer.safetensors", "state.json"]
            .iter()
            .map(|f| fs::metadata(dst.join(f)).map(|m| m.len()).unwrap_or(0))
            .sum();
        for old in self.steps().into_iter().skip(keep.max(1)) {
            let _ = fs::remove_dir_all(self.root.join(step_name(old)));
        }
        Ok((dst, bytes))
    }

    /// Read and verify one checkpoint folder.
    pub fn load_from(path: &Path, device: &Device) -> Result<LoadedCheckpoint> {
        let state_path = path.join("state.json");
        let text = fs::read_to_string(&state_path)
            .with_context(|| format!("reading {}", state_path.display()))?;
        let state: CheckpointState = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid state.json", state_path.display()))?;
        if state.format_version != CHECKPOINT_FORMAT {
            bail!(
                "{} has checkpoint format {}, this engine reads {CHECKPOINT_FORMAT}",
                path.display(),
                state.format_version
            );
        }
        for (file, want) in [
            ("model.safetensors", &state.model_sha256),
            ("optimizer.safetensors", &state.optimizer_sha256),
        ] {
            let got = sha256_file(&path.join(file))?;
            if &got != want {
                bail!(
                    "{}/{file} fails its sha256 check (corrupt or truncated)",
                    path.display()
                );
            }
        }
        let model = candle_core::safetensors::load(path.join("model.safetensors"), device)?;
        let optimizer = candle_core::safetensors::load(path.join("optimizer.safetensors"), device)?;
        Ok(LoadedCheckpoint {
            path: path.to_path_buf(),
            state,
            model,
            optimizer,
        })
    }

    /// The newest valid checkpoint: the `latest` pointer first, then every folder newest first; corrupt
    /// ones are skipped with a warning. `None` when the run has none.
    pub fn load_latest(&self, device: &Device) -> Result<Option<LoadedCheckpoint>> {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Ok(name) = fs::read_to_string(self.root.join("latest")) {
            candidates.push(self.root.join(name.trim()));
        }
        for step in self.steps() {
            let p = self.root.join(step_name(step));
            if !candidates.contains(&p) {
                candidates.push(p);
            }
        }
        for path in candidates {
            if !path.is_dir() {
                continue;
            }
            match Self::load_from(&path, device) {
                Ok(ck) => return Ok(Some(ck)),
                Err(e) => tracing::warn!("skipping checkpoint {}: {e:#}", path.display()),
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: u64) -> CheckpointState {
        let cfg = ModelConfig::default();
        CheckpointState {
            format_version: CHECKPOINT_FORMAT,
            step,
            tokens: step * 10,
            elapsed_s: 1.0,
            rng_seed: 1,
            rng_word_pos: "0".into(),
            config_hash: config_hash(&cfg),
            model_config: cfg,
            world_size: 1,
            model_sha256: String::new(),
            optimizer_sha256: String::new(),
            last_val_loss: None,
        }
    }

    #[test]
    fn corrupt_latest_falls_back_to_previous() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let ck = CheckpointDir::new(dir.path());
        let dev = Device::Cpu;
        let mut model = HashMap::new();
        model.insert(
            "w".to_string(),
            Tensor::ones((2, 2), candle_core::DType::F32, &dev)?,
        );
        let opt = HashMap::from([(
            "m.w".to_string(),
            Tensor::zeros((2, 2), candle_core::DType::F32, &dev)?,
        )]);
        ck.save(state(10), &model, &opt, 3)?;
        let (p20, bytes) = ck.save(state(20), &model, &opt, 3)?;
        assert!(bytes > 0);
        assert_eq!(ck.load_latest(&dev)?.expect("a checkpoint").state.step, 20);
        // Truncate the newest model file: loading must skip it and use step 10.
        let f = fs::OpenOptions::new()
            .write(true)
            .open(p20.join("model.safetensors"))?;
        f.set_len(8)?;
        assert_eq!(ck.load_latest(&dev)?.expect("a checkpoint").state.step, 10);
        // Pruning keeps the newest `keep`.
        ck.save(state(30), &model, &opt, 2)?;
        assert_eq!(ck.steps(), vec![30, 20]);
        Ok(())
    }
}
