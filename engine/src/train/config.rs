//! `TrainConfig`: the flat key space of `engine train` (the contract sweep files and scripts rely on).
//!
//! Layers, later ones win: built-in defaults → `--config` TOML → `ENGINE_<KEY>` environment → `--set k=v`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::model::{Backbone, MixerKind, ModelConfig, QuantEps, TokenEta, WeightKind};
use crate::train::optim::{Cooldown, LrSchedule, Schedule};

/// Every setting of a training run. Each key has a default except `data_dir`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    // --- model ---
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub mixer: MixerKind,
    pub weights: WeightKind,
    pub mlp_hidden: Option<usize>,
    pub ttt_mini_batch: usize,
    pub ttt_base_lr: f64,
    pub tie_embeddings: bool,
    // The authors' TTT-Linear details (see `ModelConfig`). Unset in a file means the authors' value for a new
    // run, and the engine's first definition when resuming a run whose config.toml predates the keys; a run
    // writes them all out resolved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttt_token_eta: Option<TokenEta>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttt_lr_bias: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttt_inner_rope: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttt_post_norm: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttt_backbone: Option<Backbone>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttt_conv_kernel: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm_eps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quant_eps: Option<QuantEps>,
    // --- data ---
    /// A `data_prep build` output folder; the vocab comes from its `meta.json`.
    pub data_dir: Option<PathBuf>,
    /// Sequences per optimizer step (the global batch, split into `grad_accum` micro-batches).
    pub batch_size: usize,
    pub context_len: usize,
    // --- length: the first limit reached ends the run ---
    pub steps: Option<u64>,
    pub max_tokens: Option<u64>,
    pub max_seconds: Option<f64>,
    // --- optimisation ---
    pub lr: f64,
    pub warmup_steps: u64,
    pub min_lr: f64,
    pub lr_schedule: LrSchedule,
    /// WSD: the share of the run its cooldown takes.
    pub cooldown_fraction: f64,
    pub cooldown: Cooldown,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub grad_accum: usize,
    // --- bookkeeping ---
    pub log_every: u64,
    pub eval_every: u64,
    pub eval_batches: usize,
    pub checkpoint_every: u64,
    pub keep_checkpoints: usize,
    pub seed: u64,
    /// `cpu`, `cuda:N`, or `cuda` (GPU LOCAL_RANK).
    pub device: String,
    /// `f32`, or `bf16` on CUDA: mixed precision (bf16 matmuls, f32 weights, optimizer and loss).
    pub dtype: String,
}

impl Default for TrainConfig {
    fn default() -> Self {
        let m = ModelConfig::default();
        Self {
            dim: m.dim,
            n_layers: m.n_layers,
            n_heads: m.n_heads,
            mixer: m.mixer,
            weights: m.weights,
            mlp_hidden: m.mlp_hidden,
            ttt_mini_batch: m.ttt_mini_batch,
            ttt_base_lr: m.ttt_base_lr,
            tie_embeddings: m.tie_embeddings,
            ttt_token_eta: None,
            ttt_lr_bias: None,
            ttt_inner_rope: None,
            ttt_post_norm: None,
            ttt_backbone: None,
            ttt_conv_kernel: None,
            norm_eps: None,
            quant_eps: None,
            data_dir: None,
            batch_size: 16,
            context_len: 128,
            steps: None,
            max_tokens: None,
            max_seconds: None,
            lr: 3e-3,
            warmup_steps: 50,
            min_lr: 3e-4,
            lr_schedule: LrSchedule::Cosine,
            cooldown_fraction: 0.2,
            cooldown: Cooldown::Linear,
            weight_decay: 0.1,
            grad_clip: 1.0,
            grad_accum: 1,
            log_every: 10,
            eval_every: 100,
            eval_batches: 8,
            checkpoint_every: 100,
            keep_checkpoints: 3,
            seed: 0,
            device: "cpu".into(),
            dtype: "f32".into(),
        }
    }
}

/// What each key means (`engine keys` prints these with the defaults).
pub const KEY_DOCS: [(&str, &str); 40] = [
    ("dim", "model width D (a multiple of n_heads)"),
    ("n_layers", "blocks: [RMSNorm → mixer → +x; RMSNorm → SwiGLU → +x]"),
    ("n_heads", "heads of the mixer (TTT or attention)"),
    ("mixer", "\"ttt\" (TTT-Linear) or \"attention\" (RoPE causal attention)"),
    ("weights", "\"ternary\" (BitLinear b1.58) or \"float\" block linears"),
    ("mlp_hidden", "SwiGLU hidden size (unset: 4·D rounded up to a multiple of 64)"),
    ("ttt_mini_batch", "tokens per TTT inner-loop mini-batch"),
    ("ttt_base_lr", "TTT inner learning rate η_base"),
    ("tie_embeddings", "share the embedding matrix with the output head"),
    ("ttt_token_eta", "\"index\": TTT inner step of token t in its mini-batch × max(0, 1/(t+1) + learned offset); \"none\": × 1"),
    ("ttt_lr_bias", "a learned bias in the TTT inner learning-rate gate θ_lr"),
    ("ttt_inner_rope", "RoPE on the TTT inner Q/K at the position inside the mini-batch"),
    ("ttt_post_norm", "LayerNorm on the TTT output before its output projection"),
    ("ttt_backbone", "\"transformer\" or \"mamba\" (causal conv sub-block, Q/K convs, GELU gate)"),
    ("ttt_conv_kernel", "kernel size of the Mamba backbone's causal convolutions"),
    ("norm_eps", "ε of the RMSNorms"),
    ("quant_eps", "BitLinear scale guard: \"clamp\" max(s, 1e-5) or \"add\" s + 1e-5"),
    ("data_dir", "a `data_prep build` output (the vocab comes from its meta.json)"),
    ("batch_size", "sequences per optimizer step, over all ranks and micro-batches"),
    ("context_len", "tokens per sequence"),
    ("steps", "run length in optimizer steps (the first of steps/max_tokens/max_seconds ends it; none set: 1000)"),
    ("max_tokens", "run length in training tokens"),
    ("max_seconds", "run length in training seconds"),
    ("lr", "peak learning rate (AdamW)"),
    ("warmup_steps", "linear warm-up steps before the decay (or the stable phase)"),
    ("min_lr", "learning rate at the end of the decay"),
    ("lr_schedule", "\"cosine\" (decay over the run) or \"wsd\" (warm-up, stable at lr, cooldown at the end)"),
    ("cooldown_fraction", "wsd: the share of the run the cooldown takes"),
    ("cooldown", "wsd: the cooldown's shape, \"linear\" or \"1-sqrt\""),
    ("weight_decay", "AdamW decoupled weight decay"),
    ("grad_clip", "clip the global gradient norm to this (0: off)"),
    ("grad_accum", "micro-batches per step (batch_size is split into them)"),
    ("log_every", "steps between step events (loss, lr, tokens/s)"),
    ("eval_every", "steps between evals on the fixed val batches"),
    ("eval_batches", "val batches of 8 windows per eval (bounded by what val.bin holds)"),
    ("checkpoint_every", "steps between checkpoints"),
    ("keep_checkpoints", "newest checkpoints kept"),
    ("seed", "seed of the weights and the data order"),
    ("device", "\"cpu\", \"cuda:N\", or \"cuda\" (GPU LOCAL_RANK)"),
    ("dtype", "\"f32\", or \"bf16\" on CUDA (mixed precision)"),
];

/// `engine keys`: every key with its default and meaning, one per line.
pub fn keys_table() -> String {
    let mut cfg = TrainConfig::default();
    cfg.resolve_model_keys(false);
    let defaults = toml::Value::try_from(cfg)
        .ok()
        .and_then(|v| v.as_table().cloned())
        .unwrap_or_default();
    let mut out = String::new();
    for (key, doc) in KEY_DOCS {
        let default = defaults
            .get(key)
            .map_or_else(|| "(unset)".to_string(), |v| v.to_string());
        out.push_str(&format!("{key:<17} {default:<10} {doc}\n"));
    }
    out
}

/// Default run length when none of `steps`, `max_tokens`, `max_seconds` is set.
pub const DEFAULT_STEPS: u64 = 1000;

/// Every key with a value of its type (the optional keys set): the schema of the flat config.
fn full_table() -> toml::Table {
    let mut cfg = TrainConfig {
        data_dir: Some(PathBuf::new()),
        steps: Some(0),
        max_tokens: Some(0),
        max_seconds: Some(0.0),
        mlp_hidden: Some(0),
        ..TrainConfig::default()
    };
    cfg.resolve_model_keys(false);
    match toml::Value::try_from(cfg) {
        Ok(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    }
}

/// The key names of the flat config (for validating sweep files and filtering the environment).
pub fn known_keys() -> Vec<String> {
    full_table().keys().cloned().collect()
}

/// What a key takes, for sweeps that sample it from a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Integer,
    Float,
    /// A flag: only `[true, false]` make sense.
    Bool,
    /// A name or a path: only listed values make sense.
    Text,
}

/// The kind of value `key` takes (`Text` for unknown keys).
pub fn key_kind(key: &str) -> KeyKind {
    match full_table().get(key) {
        Some(toml::Value::Integer(_)) => KeyKind::Integer,
        Some(toml::Value::Float(_)) => KeyKind::Float,
        Some(toml::Value::Boolean(_)) => KeyKind::Bool,
        _ => KeyKind::Text,
    }
}

/// Parse `key=value`; the value is read as a TOML value (`8`, `0.5`, `true`, `"x"`) or else as a string.
pub fn parse_set(kv: &str) -> Result<(String, toml::Value)> {
    let Some((key, value)) = kv.split_once('=') else {
        bail!("--set {kv:?} is not key=value: write e.g. --set steps=100");
    };
    let key = key.trim().to_string();
    let value = value.trim();
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    Ok((key, parsed))
}

impl TrainConfig {
    /// Resolve defaults → `file` → `ENGINE_*` env → `sets`. Unknown keys are errors that name them.
    pub fn load(file: Option<&Path>, sets: &[String]) -> Result<Self> {
        let mut fig = Figment::from(Serialized::defaults(TrainConfig::default()));
        if let Some(path) = file {
            if !path.is_file() {
                bail!(
                    "config file {} not found: pass an existing TOML file to --config",
                    path.display()
                );
            }
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let table = text.parse::<toml::Table>().map_err(|e| {
                anyhow::anyhow!(
                    "{} is not valid TOML: {}",
                    path.display(),
                    one_line(&e.to_string())
                )
            })?;
            if table.contains_key("sweep") || table.contains_key("base") {
                bail!(
                    "{} is a sweep file ([base]/[sweep] tables), not a run config: run it with `runner sweep {}`, or give `engine train` one flat table of run keys",
                    path.display(),
                    path.display()
                );
            }
            fig = fig.merge(Toml::file(path));
        }
        let keys = known_keys();
        fig = fig.merge(
            // figment lowercases env keys only after filtering: compare without case.
            Env::prefixed("ENGINE_")
                .filter(move |k| keys.iter().any(|n| n.eq_ignore_ascii_case(k.as_str()))),
        );
        for kv in sets {
            let (key, value) = parse_set(kv)?;
            fig = fig.merge(Serialized::default(&key, value));
        }
        let cfg: TrainConfig = fig.extract().map_err(|e| {
            anyhow::anyhow!(
                "invalid run config: {}",
                describe_config_error(e, Some("--set"))
            )
        })?;
        Ok(cfg)
    }

    /// Resolve defaults → a table of settings (e.g. a sweep's `[base]` plus swept values). Unknown keys are
    /// errors that name them.
    pub fn from_table(table: &toml::Table) -> Result<Self> {
        Figment::from(Serialized::defaults(TrainConfig::default()))
            .merge(Serialized::defaults(table))
            .extract()
            .map_err(|e| anyhow::anyhow!("{}", describe_config_error(e, None)))
    }

    /// Overlay `--set` values on an existing config (used on resume).
    pub fn with_sets(&self, sets: &[String]) -> Result<Self> {
        let mut fig = Figment::from(Serialized::defaults(self.clone()));
        for kv in sets {
            let (key, value) = parse_set(kv)?;
            fig = fig.merge(Serialized::default(&key, value));
        }
        fig.extract().map_err(|e| {
            anyhow::anyhow!(
                "invalid run config: {}",
                describe_config_error(e, Some("--set"))
            )
        })
    }

    /// Check the settings that do not need the data folder.
    pub fn validate(&self) -> Result<()> {
        if self.data_dir.is_none() {
            bail!("data_dir is not set: add data_dir = \"DIR\" (a `data_prep build` output) to the config or --set data_dir=DIR");
        }
        for (name, v) in [
            ("batch_size", self.batch_size),
            ("context_len", self.context_len),
            ("grad_accum", self.grad_accum),
            ("eval_batches", self.eval_batches),
            ("keep_checkpoints", self.keep_checkpoints),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1 (got 0)");
            }
        }
        for (name, v) in [
            ("log_every", self.log_every),
            ("eval_every", self.eval_every),
            ("checkpoint_every", self.checkpoint_every),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1 (got 0)");
            }
        }
        if !self.batch_size.is_multiple_of(self.grad_accum) {
            bail!(
                "batch_size = {} is not divisible by grad_accum = {}: batch_size is the whole batch per step, split into grad_accum micro-batches",
                self.batch_size,
                self.grad_accum
            );
        }
        // `(0.0..=x).contains` is false for NaN, so NaN fails every check.
        let lr_ok = self.lr > 0.0 && self.lr.is_finite() && (0.0..=self.lr).contains(&self.min_lr);
        if !lr_ok {
            bail!(
                "need 0 <= min_lr <= lr and lr > 0 (got lr = {}, min_lr = {})",
                self.lr,
                self.min_lr
            );
        }
        if !(0.0..=1.0).contains(&self.cooldown_fraction) {
            bail!(
                "cooldown_fraction = {}: give the share of the run the cooldown takes, from 0 to 1 (0.2 is usual)",
                self.cooldown_fraction
            );
        }
        let decay_ok = self.weight_decay.is_finite() && self.weight_decay >= 0.0;
        let clip_ok = (0.0..=f64::INFINITY).contains(&self.grad_clip);
        if !(decay_ok && clip_ok) {
            bail!(
                "weight_decay must be a finite number >= 0 and grad_clip a number >= 0 (0 turns clipping off; got {} and {})",
                self.weight_decay,
                self.grad_clip
            );
        }
        match self.dtype.as_str() {
            "f32" => {}
            // Mixed precision: bf16 matmuls, f32 weights and optimizer (model/precision.rs). Candle's CPU
            // backend has no bf16 matmul, and it would be slower than f32 there anyway.
            "bf16" if self.device.starts_with("cuda") => {}
            "bf16" => bail!(
                "dtype = \"bf16\" needs a CUDA device (bf16 matmuls are a GPU speed-up; the CPU has no bf16 matmul kernel): use dtype = \"f32\" on {}",
                self.device
            ),
            other => bail!("dtype = {other:?} is not supported: use \"f32\" (or \"bf16\" on CUDA)"),
        }
        if self.device != "cpu" && !self.device.starts_with("cuda") {
            bail!(
                "device = {:?} is not known: use \"cpu\" or \"cuda:N\"",
                self.device
            );
        }
        if matches!(self.steps, Some(0)) || matches!(self.max_tokens, Some(0)) {
            bail!("steps and max_tokens must be at least 1 when set");
        }
        if let Some(s) = self.max_seconds {
            if s.is_nan() || s <= 0.0 {
                bail!("max_seconds must be > 0 when set (got {s})");
            }
        }
        Ok(())
    }

    /// Sequences each rank runs through one forward/backward: the global `batch_size` split over `world`
    /// ranks and `grad_accum` micro-batches. Training and the memory estimate both use it.
    pub fn micro_batch(&self, world: usize) -> usize {
        self.batch_size / (world.max(1) * self.grad_accum)
    }

    /// Refuse a rank count the batch does not split over evenly (`ranks` names where the count came from:
    /// `WORLD_SIZE`, `procs_per_run`, `gpus_per_run`).
    pub fn check_ranks(&self, world: usize, ranks: &str) -> Result<()> {
        if !self
            .batch_size
            .is_multiple_of(world.max(1) * self.grad_accum)
        {
            bail!(
                "batch_size = {} must be divisible by {ranks} × grad_accum = {world} × {}: each rank takes an equal slice of every batch",
                self.batch_size,
                self.grad_accum
            );
        }
        Ok(())
    }

    /// Estimated peak bytes of one rank's training step (the runner's skip rule and the engine's own
    /// refusal use this one figure).
    pub fn training_memory_estimate(&self, model: &ModelConfig, world: usize) -> u64 {
        model.training_memory_estimate(self.micro_batch(world), self.context_len, &self.dtype)
    }

    /// Give every unset authors'-detail key its value: the authors' for a new run, the engine's first
    /// definition when `resuming` a run whose config.toml predates the keys (its checkpoints were trained so).
    pub fn resolve_model_keys(&mut self, resuming: bool) {
        let d = match resuming {
            true => ModelConfig::default().legacy(),
            false => ModelConfig::default(),
        };
        self.ttt_token_eta.get_or_insert(d.ttt_token_eta);
        self.ttt_lr_bias.get_or_insert(d.ttt_lr_bias);
        self.ttt_inner_rope.get_or_insert(d.ttt_inner_rope);
        self.ttt_post_norm.get_or_insert(d.ttt_post_norm);
        self.ttt_backbone.get_or_insert(d.ttt_backbone);
        self.ttt_conv_kernel.get_or_insert(d.ttt_conv_kernel);
        self.norm_eps.get_or_insert(d.norm_eps);
        self.quant_eps.get_or_insert(d.quant_eps);
    }

    /// The model part of the config, with the vocab of the data (unset keys: the authors' values).
    pub fn model_config(&self, vocab_size: usize) -> ModelConfig {
        let d = ModelConfig::default();
        ModelConfig {
            vocab_size,
            dim: self.dim,
            n_layers: self.n_layers,
            n_heads: self.n_heads,
            mixer: self.mixer,
            weights: self.weights,
            mlp_hidden: self.mlp_hidden,
            ttt_mini_batch: self.ttt_mini_batch,
            ttt_base_lr: self.ttt_base_lr,
            tie_embeddings: self.tie_embeddings,
            ttt_token_eta: self.ttt_token_eta.unwrap_or(d.ttt_token_eta),
            ttt_lr_bias: self.ttt_lr_bias.unwrap_or(d.ttt_lr_bias),
            ttt_inner_rope: self.ttt_inner_rope.unwrap_or(d.ttt_inner_rope),
            ttt_post_norm: self.ttt_post_norm.unwrap_or(d.ttt_post_norm),
            ttt_backbone: self.ttt_backbone.unwrap_or(d.ttt_backbone),
            ttt_conv_kernel: self.ttt_conv_kernel.unwrap_or(d.ttt_conv_kernel),
            norm_eps: self.norm_eps.unwrap_or(d.norm_eps),
            quant_eps: self.quant_eps.unwrap_or(d.quant_eps),
        }
    }

    /// Steps the cosine schedule decays over: `steps`, or what `max_tokens` implies; `None` with only
    /// `max_seconds` (the rate stays at `lr` after warm-up).
    pub fn schedule_horizon(&self) -> Option<u64> {
        let tokens_per_step = (self.batch_size * self.context_len) as u64;
        match (self.steps, self.max_tokens, self.max_seconds) {
            (Some(s), _, _) => Some(s),
            (None, Some(t), _) => Some(t.div_ceil(tokens_per_step)),
            (None, None, Some(_)) => None,
            (None, None, None) => Some(DEFAULT_STEPS),
        }
    }

    /// The learning rate by step.
    pub fn schedule(&self) -> Schedule {
        Schedule {
            kind: self.lr_schedule,
            lr: self.lr,
            min_lr: self.min_lr,
            warmup: self.warmup_steps,
            horizon: self.schedule_horizon(),
            cooldown_fraction: self.cooldown_fraction,
            cooldown: self.cooldown,
        }
    }

    /// Whether the run is over after `step` steps, `tokens` tokens and `elapsed_s` seconds.
    pub fn finished(&self, step: u64, tokens: u64, elapsed_s: f64) -> bool {
        let by_steps = match (self.steps, self.max_tokens, self.max_seconds) {
            (None, None, None) => step >= DEFAULT_STEPS,
            _ => self.steps.is_some_and(|s| step >= s),
        };
        by_steps
            || self.max_tokens.is_some_and(|t| tokens >= t)
            || self.max_seconds.is_some_and(|s| elapsed_s >= s)
    }

    /// TOML text of the resolved config (written to `RUN_DIR/config.toml`).
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }
}

/// One line for a configuration error: the key, what is wrong with it, and where the value came from (a
/// file, the environment variable, or `code_source` for values given in code: `--set`) — not figment's
/// own text, which names source-code locations of this crate and the profile (`default.`).
pub fn describe_config_error(e: figment::Error, code_source: Option<&str>) -> String {
    use figment::error::Kind;
    use figment::Source;
    let parts: Vec<String> = e
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let what = match &e.kind {
                Kind::UnknownField(field, known) => {
                    let prefix = key.strip_suffix(field.as_str()).unwrap_or("");
                    format!("unknown key `{prefix}{field}` ({})", suggest(field, known))
                }
                Kind::UnknownVariant(v, known) => {
                    format!("`{key}` = {v:?} is not one of {}", known.join(", "))
                }
                Kind::MissingField(field) if key.is_empty() => format!("missing key `{field}`"),
                Kind::MissingField(field) => format!("missing key `{key}.{field}`"),
                other if key.is_empty() => other.to_string(),
                other => format!("`{key}`: {other}"),
            };
            let from = match e.metadata.as_ref() {
                Some(m) => match &m.source {
                    Some(Source::File(p)) => format!(" in {}", p.display()),
                    Some(Source::Code(_)) => code_source
                        .map(|s| format!(" (from {s})"))
                        .unwrap_or_default(),
                    Some(Source::Custom(s)) => format!(" in {s}"),
                    // figment's Env provider: "`PREFIX_` environment variable(s)"; name the variable.
                    None => match m.name.split('`').nth(1) {
                        Some(prefix) if !key.is_empty() => format!(
                            " (from {prefix}{})",
                            key.replace('.', "__").to_ascii_uppercase()
                        ),
                        _ => format!(" (from {})", m.name.replace('`', "")),
                    },
                    Some(_) => String::new(),
                },
                None => String::new(),
            };
            one_line(&format!("{what}{from}"))
        })
        .collect();
    parts.join("; ")
}

/// "did you mean `dim`?" for a key close to a known one (a typo), else the list of known keys.
pub fn suggest<S: AsRef<str>>(key: &str, known: &[S]) -> String {
    let best = known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(key, k.as_ref()), k.as_ref()))
        .min_by_key(|(d, _)| *d);
    match best {
        Some((d, k)) if d <= 2.max(key.len() / 4) && d < key.len() => {
            format!("did you mean `{k}`? `engine keys` lists them all")
        }
        _ => format!(
            "known keys: {}",
            known
                .iter()
                .map(AsRef::as_ref)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Figment errors can span lines; the CLI prints one.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_documented_and_typos_get_a_suggestion() {
        let mut documented: Vec<&str> = KEY_DOCS.iter().map(|(k, _)| *k).collect();
        let mut known = known_keys();
        documented.sort();
        known.sort();
        assert_eq!(documented, known);
        assert!(keys_table().contains("batch_size        16"));
        assert!(suggest("n_layerz", &known).contains("did you mean `n_layers`?"));
        assert!(suggest("completely_else", &known).contains("known keys: "));
    }

    #[test]
    fn layers_apply_in_order_and_unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run.toml");
        std::fs::write(
            &file,
            "dim = 64\nn_heads = 2\nsteps = 5\nmixer = \"attention\"\n",
        )
        .unwrap();
        let cfg =
            TrainConfig::load(Some(&file), &["steps=7".into(), "weights=float".into()]).unwrap();
        assert_eq!((cfg.dim, cfg.n_heads, cfg.steps), (64, 2, Some(7)));
        assert_eq!(cfg.mixer, MixerKind::Attention);
        assert_eq!(cfg.weights, WeightKind::Float);
        assert_eq!(cfg.batch_size, TrainConfig::default().batch_size);

        std::fs::write(&file, "dimm = 64\n").unwrap();
        let err = TrainConfig::load(Some(&file), &[]).unwrap_err().to_string();
        assert!(err.contains("dimm"), "{err}");
        let err = TrainConfig::load(None, &["bogus_key=1".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus_key"), "{err}");
        // Where the value came from, in the user's words (not figment's source locations).
        assert!(err.contains("--set") && !err.contains(".rs:"), "{err}");
        let err = TrainConfig::load(None, &["mixer=lstm".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`mixer` = \"lstm\" is not one of ttt, attention"),
            "{err}"
        );
        std::fs::write(&file, "dim = [\n").unwrap();
        let err = TrainConfig::load(Some(&file), &[]).unwrap_err().to_string();
        assert!(
            err.contains("not valid TOML") && !err.contains('\n'),
            "{err}"
        );
        std::fs::write(&file, "[base]\ndim = 64\n[sweep]\nn_layers = [1, 2]\n").unwrap();
        let err = TrainConfig::load(Some(&file), &[]).unwrap_err().to_string();
        assert!(err.contains("runner sweep"), "{err}");
    }

    #[test]
    fn round_trips_through_toml() {
        let cfg = TrainConfig {
            data_dir: Some("d".into()),
            steps: Some(3),
            ..TrainConfig::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, cfg.to_toml().unwrap()).unwrap();
        assert_eq!(TrainConfig::load(Some(&file), &[]).unwrap(), cfg);
    }

    #[test]
    fn known_keys_cover_the_contract() {
        let keys = known_keys();
        for k in [
            "dim",
            "n_layers",
            "mixer",
            "data_dir",
            "steps",
            "max_seconds",
            "dtype",
            "mlp_hidden",
        ] {
            assert!(keys.iter().any(|x| x == k), "{k} missing");
        }
    }

    #[test]
    fn validation_rejects_bad_settings() {
        let ok = TrainConfig {
            data_dir: Some("d".into()),
            ..TrainConfig::default()
        };
        assert!(ok.validate().is_ok());
        assert!(TrainConfig::default()
            .validate()
            .unwrap_err()
            .to_string()
            .contains("data_dir"));
        let bad = TrainConfig {
            grad_accum: 3,
            ..ok.clone()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("grad_accum"));
        let bad = TrainConfig {
            dtype: "bf16".into(),
            ..ok.clone()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("CUDA"));
        // NaN and infinities are refused, not passed on to the optimizer.
        for bad in [
            TrainConfig {
                min_lr: f64::NAN,
                ..ok.clone()
            },
            TrainConfig {
                lr: f64::NAN,
                ..ok.clone()
            },
            TrainConfig {
                weight_decay: f64::NAN,
                ..ok.clone()
            },
            TrainConfig {
                weight_decay: f64::INFINITY,
                ..ok.clone()
            },
            TrainConfig {
                grad_clip: f64::NAN,
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        let gpu = TrainConfig {
            dtype: "bf16".into(),
            device: "cuda:0".into(),
            ..ok
        };
        gpu.validate().unwrap();
    }
}
