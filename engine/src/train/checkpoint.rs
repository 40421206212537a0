//! `CheckpointDir`: atomic, verified checkpoints under `RUN_DIR/checkpoints/`.
//!
//! A checkpoint is a folder `step-NNNNNNNN/` with `model.safetensors`, `optimizer.safetensors` and
//! `state.json` (step, RNG position, tokens seen, config hash, sha256 of both tensor files). It is written
//! under `.tmp-step-NNNNNNNN/`, every file fsynced, renamed into place, the parent fsynced, and only then is
//! the `latest` pointer replaced (temp file + rename). A crash at any instant leaves the previous checkpoint
//! usable; a checkpoint whose files fail their sha256 is skipped with a warning on load (and the run's
//! leader renames it `unusable-step-N` so it is neither loaded again nor counted by pruning). A run whose
//! checkpoints all fail refuses to resume rather than silently start over.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
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
    /// An eval was due at this step but a stop signal cut it short: the resume runs it first.
    #[serde(default)]
    pub eval_due: bool,
}

/// A checkpoint read back from disk.
pub struct LoadedCheckpoint {
    pub path: PathBuf,
    pub state: CheckpointState,
    pub model: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    /// Newer checkpoint folders that were damaged ([`Corrupt`]) and passed over for this one: see
    /// [`CheckpointDir::set_aside`].
    pub skipped: Vec<PathBuf>,
}

/// Hash of a model config, stored in checkpoints.
pub fn config_hash(cfg: &ModelConfig) -> String {
    hex::encode(Sha256::digest(
        serde_json::to_vec(cfg).expect("config serialises"),
    ))
}

/// sha256 of a file, streamed (data_prep's, so there is one implementation).
pub fn sha256_file(path: &Path) -> Result<String> {
    Ok(data_prep::fsutil::sha256_file(path)?)
}

fn fsync_path(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("fsync {}", path.display()))
}

/// Write `bytes` to `path` atomically: temp file, fsync, rename, fsync the folder (data_prep's).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(data_prep::fsutil::write_atomic(path, bytes)?)
}

/// A checkpoint folder whose own files are damaged (see [`CheckpointDir::verify`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Corrupt(String);

/// Bytes of a checkpoint folder's three files.
fn folder_bytes(dir: &Path) -> u64 {
    ["model.safetensors", "optimizer.safetensors", "state.json"]
        .iter()
        .map(|f| fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0))
        .sum()
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
        let dst = self.root.join(&name);
        if Self::verify(&dst).is_ok_and(|s| s.step == state.step) {
            // This step is already on disk and sound (a resumed run that ends where it was resumed, or a stop
            // right after a periodic save): the state is the same, and replacing the folder would open a
            // window in which this step exists nowhere.
            write_atomic(&self.root.join("latest"), name.as_bytes())?;
            let bytes = folder_bytes(&dst);
            return Ok((dst, bytes));
        }
        let tmp = self.root.join(format!(".tmp-{name}"));
        if let Err(e) = Self::write_folder(&tmp, &mut state, model, optimizer) {
            // Leave no half-written folder behind (it may hold most of a full disk).
            let _ = fs::remove_dir_all(&tmp);
            let newest = match self.steps().into_iter().max() {
                Some(s) => format!("the newest checkpoint (step {s}) is intact"),
                None => "there is no earlier checkpoint".to_string(),
            };
            let full = e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .and_then(|io| io.raw_os_error())
                    == Some(28)
            });
            let hint = if full {
                ": the disk is full; free space there (or lower keep_checkpoints) and resume"
            } else {
                ""
            };
            bail!(
                "the checkpoint of step {} could not be written to {} ({}); {newest}{hint}",
                state.step,
                self.root.display(),
                crate::error_line(&e)
            );
        }
        if dst.exists() {
            // Same step, but the folder on disk failed its check above: nothing sound is lost.
            fs::remove_dir_all(&dst)?;
        }
        fs::rename(&tmp, &dst).with_context(|| format!("renaming {} into place", tmp.display()))?;
        fsync_path(&self.root)?;
        write_atomic(&self.root.join("latest"), name.as_bytes())?;
        let bytes = folder_bytes(&dst);
        // Keep this one and the newest `keep - 1` before it; never touch a folder of a later step.
        let older = self.steps().into_iter().filter(|s| *s < state.step);
        for old in older.skip(keep.max(1) - 1) {
            let _ = fs::remove_dir_all(self.root.join(step_name(old)));
        }
        Ok((dst, bytes))
    }

    /// Start another run from this run's checkpoint of `step` (a fork): its folder is copied into
    /// `RUN_DIR/checkpoints/` of `into` (files hard-linked where the filesystem allows, copied otherwise;
    /// checkpoint files are never written in place), verified, renamed into place and made `latest`, as a
    /// save would. `into`'s `config.toml` is the caller's to write, last: an engine then resumes the fork
    /// from this step.
    pub fn fork_into(&self, step: u64, into: &Path) -> Result<PathBuf> {
        let name = step_name(step);
        let src = self.root.join(&name);
        Self::verify(&src).with_context(|| {
            format!(
                "the checkpoint of step {step} to fork from ({}) is missing or damaged",
                src.display()
            )
        })?;
        let dst_root = into.join("checkpoints");
        fs::create_dir_all(&dst_root)
            .with_context(|| format!("creating {}", dst_root.display()))?;
        let dst = dst_root.join(&name);
        if Self::verify(&dst).is_ok_and(|s| s.step == step) {
            write_atomic(&dst_root.join("latest"), name.as_bytes())?;
            return Ok(dst);
        }
        let tmp = dst_root.join(format!(".tmp-{name}"));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp)?;
        for entry in fs::read_dir(&src)? {
            let entry = entry?;
            let to = tmp.join(entry.file_name());
            if fs::hard_link(entry.path(), &to).is_err() {
                fs::copy(entry.path(), &to)
                    .with_context(|| format!("copying {}", entry.path().display()))?;
                fs::File::open(&to)?.sync_all()?;
            }
        }
        fsync_path(&tmp)?;
        Self::verify(&tmp)?;
        if dst.exists() {
            fs::remove_dir_all(&dst)?;
        }
        fs::rename(&tmp, &dst).with_context(|| format!("renaming {} into place", tmp.display()))?;
        fsync_path(&dst_root)?;
        write_atomic(&dst_root.join("latest"), name.as_bytes())?;
        Ok(dst)
    }

    /// Write the checkpoint files into the fresh folder `tmp`, each fsynced, hashes into `state`.
    fn write_folder(
        tmp: &Path,
        state: &mut CheckpointState,
        model: &HashMap<String, Tensor>,
        optimizer: &HashMap<String, Tensor>,
    ) -> Result<()> {
        if tmp.exists() {
            fs::remove_dir_all(tmp)?;
        }
        fs::create_dir(tmp)?;
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
        fsync_path(tmp)
    }

    /// Rename checkpoint folders that failed to load to `unusable-step-N` (kept for inspection; neither
    /// loaded nor pruned). Called by the run's leader after a resume passed them over.
    pub fn set_aside(&self, paths: &[PathBuf]) {
        for p in paths {
            let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let to = self.root.join(format!("unusable-{name}"));
            match fs::rename(p, &to) {
                Ok(()) => tracing::warn!(
                    "moved the unusable checkpoint {} to {}",
                    p.display(),
                    to.display()
                ),
                Err(e) => tracing::warn!(
                    "could not move the unusable checkpoint {} aside: {e}",
                    p.display()
                ),
            }
        }
        let _ = fsync_path(&self.root);
    }

    /// Check one checkpoint folder without loading its tensors: `state.json` parses, has this engine's
    /// format, and both tensor files match their sha256. A folder whose own content is damaged (missing or
    /// unparsable state.json, a missing or mismatching tensor file) fails with [`Corrupt`]; anything else
    /// (another format, an I/O error) with a plain error, which a resume must not step over.
    pub fn verify(path: &Path) -> Result<CheckpointState> {
        let state_path = path.join("state.json");
        let text = match fs::read_to_string(&state_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Corrupt(format!("{} has no state.json", path.display())).into())
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", state_path.display())),
        };
        let state: CheckpointState = serde_json::from_str(&text).map_err(|e| {
            Corrupt(format!(
                "{} is not a valid state.json ({e})",
                state_path.display()
            ))
        })?;
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
            if !path.join(file).is_file() {
                return Err(Corrupt(format!("{} has no {file}", path.display())).into());
            }
            let got = sha256_file(&path.join(file))?;
            if &got != want {
                return Err(Corrupt(format!(
                    "{}/{file} fails its sha256 check (corrupt or truncated)",
                    path.display()
                ))
                .into());
            }
        }
        Ok(state)
    }

    /// Read and verify one checkpoint folder.
    pub fn load_from(path: &Path, device: &Device) -> Result<LoadedCheckpoint> {
        let state = Self::verify(path)?;
        Self::load_verified(path, state, device)
    }

    /// The tensors of a folder [`Self::verify`] has just accepted (its files are hashed once, not twice).
    fn load_verified(
        path: &Path,
        state: CheckpointState,
        device: &Device,
    ) -> Result<LoadedCheckpoint> {
        let model = candle_core::safetensors::load(path.join("model.safetensors"), device)?;
        let optimizer = candle_core::safetensors::load(path.join("optimizer.safetensors"), device)?;
        Ok(LoadedCheckpoint {
            path: path.to_path_buf(),
            state,
            model,
            optimizer,
            skipped: Vec::new(),
        })
    }

    /// The newest valid checkpoint, folders newest step first; corrupt ones are skipped with a warning
    /// (and listed in `skipped`), other failures (another format, I/O) are errors. `None` when the run has no checkpoint
    /// folder; an error when it has some but none loads, naming the newest and why (starting over from
    /// step 0 must be the user's choice, not a silent fallback).
    pub fn load_latest(&self, device: &Device) -> Result<Option<LoadedCheckpoint>> {
        // Newest step first. The `latest` pointer is not trusted over the folders: a crash between
        // renaming a finished checkpoint into place and updating the pointer leaves the pointer one behind.
        let (mut skipped, mut newest_why) = (Vec::new(), None);
        for step in self.steps() {
            let path = self.root.join(step_name(step));
            // A live run rotates old checkpoints away (keep_checkpoints): a folder that disappears while it
            // is read (`engine generate` on a training run) is passed over for the next one, not an error.
            let gone = |path: &Path| !path.exists();
            match Self::verify(&path) {
                Ok(state) => {
                    // Sound on disk: a failure to load it now (I/O, device memory) is an error, not a
                    // reason to fall back to an older step.
                    match Self::load_verified(&path, state, device) {
                        Ok(mut ck) => {
                            ck.skipped = skipped;
                            return Ok(Some(ck));
                        }
                        Err(_) if gone(&path) => continue,
                        Err(e) => {
                            return Err(e.context(format!("loading checkpoint {}", path.display())))
                        }
                    }
                }
                Err(_) if gone(&path) => continue,
                Err(e) if e.downcast_ref::<Corrupt>().is_some() => {
                    tracing::warn!("skipping checkpoint {}: {e:#}", path.display());
                    newest_why.get_or_insert_with(|| format!("{e:#}"));
                    skipped.push(path);
                }
                Err(e) => return Err(e.context(format!("reading checkpoint {}", path.display()))),
            }
        }
        match newest_why {
            None => Ok(None),
            Some(why) => bail!(
                "none of the {} checkpoint(s) in {root} can be loaded (newest: {why}); restore a good copy, or delete {root} to start the run over from step 0",
                skipped.len(),
                root = self.root.display(),
            ),
        }
    }
}

/// A resumed run must read its data through the tokenizer it was trained with: the copy in the run dir
/// and `data_dir`'s must be the same file (the vocab size alone does not catch a rebuilt data dir).
pub fn check_same_tokenizer(run_dir: &Path, data_dir: &Path) -> Result<()> {
    let (ours, theirs) = (
        run_dir.join("tokenizer.json"),
        data_dir.join("tokenizer.json"),
    );
    if let (Ok(a), Ok(b)) = (std::fs::read(&ours), std::fs::read(&theirs)) {
        if a != b {
            bail!(
                "{} differs from the tokenizer this run was trained with ({}): point data_dir at the data the run was made with",
                theirs.display(),
                ours.display()
            );
        }
    }
    Ok(())
}

/// Load a checkpoint's tensors into the model's variables, refusing another architecture.
pub fn restore(
    varmap: &candle_nn::VarMap,
    ck: &LoadedCheckpoint,
    model_cfg: &ModelConfig,
) -> Result<()> {
    if ck.state.model_config.vocab_size != model_cfg.vocab_size {
        bail!(
            "checkpoint {} was trained with vocab {} but data_dir's meta.json has vocab {}: point data_dir at the data the run was trained on",
            ck.path.display(),
            ck.state.model_config.vocab_size,
            model_cfg.vocab_size
        );
    }
    if ck.state.config_hash != config_hash(model_cfg) {
        let (was, now) = (
            serde_json::to_value(&ck.state.model_config)?,
            serde_json::to_value(model_cfg)?,
        );
        let changed: Vec<String> = match (was.as_object(), now.as_object()) {
            (Some(a), Some(b)) => a
                .iter()
                .filter(|(k, v)| b.get(*k) != Some(*v))
                .map(|(k, v)| {
                    format!(
                        "{k} = {v} in the checkpoint, {} now",
                        b.get(k).unwrap_or(&serde_json::Value::Null)
                    )
                })
                .collect(),
            _ => vec![],
        };
        bail!(
            "checkpoint {} is from a different model config ({}): model keys cannot change on resume",
            ck.path.display(),
            if changed.is_empty() { "its hash differs".to_string() } else { changed.join(", ") }
        );
    }
    let data = varmap.data().lock().expect("varmap lock");
    for (name, var) in data.iter() {
        let Some(t) = ck.model.get(name) else {
            bail!("checkpoint {} has no tensor {name}", ck.path.display());
        };
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)
            .with_context(|| format!("restoring {name}"))?;
    }
    Ok(())
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
            eval_due: false,
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
        // Saving over a corrupt folder of the same step replaces it.
        ck.save(state(20), &model, &opt, 2)?;
        CheckpointDir::verify(&ck.root().join("step-00000020"))?;
        // Saving a step that is already on disk and sound leaves its folder as it is (same inode).
        use std::os::unix::fs::MetadataExt;
        let inode = |p: &str| fs::metadata(ck.root().join(p)).map(|m| m.ino());
        let before = inode("step-00000030")?;
        ck.save(state(30), &model, &opt, 2)?;
        assert_eq!(before, inode("step-00000030")?);
        // The `latest` pointer one behind (a crash before it was updated) does not hide a sound newer step.
        write_atomic(&ck.root().join("latest"), b"step-00000020")?;
        assert_eq!(ck.load_latest(&dev)?.expect("a checkpoint").state.step, 30);
        // A corrupt newer folder is passed over and listed; once set aside, pruning ignores it.
        let f = fs::OpenOptions::new()
            .write(true)
            .open(ck.root().join("step-00000030/optimizer.safetensors"))?;
        f.set_len(4)?;
        let loaded = ck.load_latest(&dev)?.expect("a checkpoint");
        assert_eq!(loaded.state.step, 20);
        assert_eq!(loaded.skipped, vec![ck.root().join("step-00000030")]);
        ck.set_aside(&loaded.skipped);
        assert_eq!(ck.steps(), vec![20]);
        assert!(ck.root().join("unusable-step-00000030").is_dir());
        // Another format is an error, not a reason to fall back.
        let mut other = state(40);
        other.format_version = CHECKPOINT_FORMAT + 1;
        ck.save(other, &model, &opt, 5)?;
        let err = format!("{:#}", ck.load_latest(&dev).err().expect("refused"));
        assert!(
            err.contains("checkpoint format") && err.contains("step-00000040"),
            "{err}"
        );
        fs::remove_dir_all(ck.root().join("step-00000040"))?;
        // Every folder corrupt: an error, not a silent fresh start.
        fs::write(ck.root().join("step-00000020/state.json"), "{")?;
        let err = ck.load_latest(&dev).err().expect("refused").to_string();
        assert!(err.contains("none of the 1 checkpoint(s)"), "{err}");
        Ok(())
    }
}
