//! Sweep files: parsing (figment: built-in defaults → TOML → `RUNNER_*` env), validation against the
//! engine's own config schema, and expansion into runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use engine::train::TrainConfig;

use crate::search::isoflop::{self, IsoFlop, KEYS as ISOFLOP_KEYS};
pub use crate::search::space::Axis;
use crate::search::space::{grid, parse_range, sample_combos, sample_points, MAX_GRID_RUNS};
use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// `[data]`: the data dir every run trains on.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// A `data_prep build` output (relative paths are relative to the working directory).
    pub dir: PathBuf,
    /// When set and `dir` is missing, build it from a synthetic corpus of this many stories (offline demos).
    pub synth_stories: Option<usize>,
    /// Vocabulary the data must have (and the synthetic build's vocab size).
    pub vocab_size: Option<usize>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    #[default]
    Grid,
    Random,
    /// Tree-structured Parzen Estimator: trials are sampled one by one from the results so far.
    Tpe,
    /// An IsoFLOP study: every (budget, size) cell trained on the tokens its budget buys.
    IsoFlop,
}

/// `[resources]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Resources {
    /// `"auto"` (detected GPUs, else cpu) or a list such as `["cuda:0", "cuda:1"]` / `["cpu"]`.
    pub devices: Devices,
    pub gpus_per_run: usize,
    /// CPU data-parallel ranks per run.
    pub procs_per_run: usize,
    /// Runs at once. CPU: engine processes at once, default 2 (they share the cores). GPUs: one run per
    /// `gpus_per_run` free GPUs, capped by this when set. Slurm: jobs kept submitted, default 2.
    pub max_parallel: Option<usize>,
    /// Memory a run may use, in GiB; default: the GPU's memory, or RAM / max_parallel on CPU.
    pub memory_gb: Option<f64>,
    /// `"local"` (this machine's devices) or `"slurm"` (one `sbatch` job per run).
    pub backend: Backend,
    /// Where run folders go (default: the runner's home). With Slurm it must be on a filesystem every
    /// node shares, as must the data dir and the engine binary.
    pub runs_dir: Option<PathBuf>,
    /// Slurm: `--partition`.
    pub partition: Option<String>,
    /// Slurm: `--account`.
    pub account: Option<String>,
    /// Slurm: `--time`, e.g. "04:00:00".
    pub time_limit: Option<String>,
    /// Slurm: nodes per run (`gpus_per_run` / `procs_per_run` are spread evenly over them).
    pub nodes_per_run: usize,
    /// Slurm: `--cpus-per-task` (also the engine's thread count on CPU jobs).
    pub cpus_per_task: Option<usize>,
    /// Slurm: how often a preempted, timed-out or cancelled job is resubmitted with `--resume`.
    pub max_restarts: u32,
    /// Slurm: more `sbatch` arguments, passed through as given, e.g. ["--qos=high", "--constraint=a100"].
    pub sbatch_args: Vec<String>,
    /// Slurm: seconds between job-state polls (`squeue`) and metrics reads.
    pub poll_seconds: f64,
    /// Local: a run whose engine writes no event for this many seconds (a stopped or hung process) is
    /// stopped and marked failed. Raise it for runs whose `log_every` steps or evals take longer.
    pub stall_seconds: f64,
}

/// Who runs the engines.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Local,
    Slurm,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Devices {
    Auto(String),
    List(Vec<String>),
}

impl Resources {
    /// Engine processes at once on CPU (and Slurm jobs kept submitted): `max_parallel`, default 2.
    pub fn cpu_parallel(&self) -> usize {
        self.max_parallel.unwrap_or(2)
    }
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            devices: Devices::Auto("auto".into()),
            gpus_per_run: 1,
            procs_per_run: 1,
            max_parallel: None,
            memory_gb: None,
            backend: Backend::Local,
            runs_dir: None,
            partition: None,
            account: None,
            time_limit: None,
            nodes_per_run: 1,
            cpus_per_task: None,
            max_restarts: 3,
            sbatch_args: Vec::new(),
            poll_seconds: 5.0,
            stall_seconds: 3600.0,
        }
    }
}

/// A whole sweep file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepFile {
    /// Defaults to the file's name without `.toml`.
    #[serde(default)]
    pub name: String,
    pub data: DataSection,
    #[serde(default)]
    pub base: toml::Table,
    #[serde(default)]
    pub sweep: toml::Table,
    #[serde(default)]
    pub resources: Resources,
    /// Early stopping (ASHA or median) with paused, resumable runs; off by default.
    #[serde(default)]
    pub early_stop: crate::search::early_stop::EarlyStop,
}

/// One run of an expanded sweep: its swept values and full engine config.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedRun {
    pub params: BTreeMap<String, toml::Value>,
    pub config: TrainConfig,
    /// The compute budget (training FLOPs) of an IsoFLOP cell.
    pub budget: Option<f64>,
    /// An IsoFLOP cell that forks from the run at this index of `runs`, at this step.
    pub fork: Option<(usize, u64)>,
}

/// A parsed, validated sweep.
#[derive(Debug, Clone)]
pub struct Sweep {
    pub file: PathBuf,
    pub spec: SweepFile,
    pub strategy: Strategy,
    /// The runs planned up front (grid, random); empty for TPE, whose trials are sampled as results come.
    pub runs: Vec<PlannedRun>,
    /// The search space, the trial budget and the sampler's seed (random and TPE).
    pub space: Vec<(String, Axis)>,
    pub trials: usize,
    pub seed: u64,
    /// The vocab of the data dir the runs were planned for.
    pub vocab: usize,
    /// The budgets of an IsoFLOP study.
    pub isoflop: Option<IsoFlop>,
}

/// The `[sweep]` key of settings that vary together.
const VARIANTS: &str = "variants";

/// Keys of `[sweep]` that steer the expansion rather than name a swept setting.
const SWEEP_CONTROL: [&str; 3] = ["strategy", "trials", "seed"];

pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl SweepFile {
    /// Read a sweep file with `RUNNER_*` environment overrides (e.g. `RUNNER_RESOURCES__MAX_PARALLEL=4`).
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, &[])
    }

    /// As [`Self::load`], then `--set section.key=value` flags on top (e.g. `resources.max_parallel=4`,
    /// `base.steps=100`).
    pub fn load_with(path: &Path, sets: &[String]) -> Result<Self> {
        if !path.is_file() {
            bail!(
                "sweep file {} not found: pass a TOML file such as experiments/quickstart.toml",
                path.display()
            );
        }
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        text.parse::<toml::Table>().map_err(|e| {
            anyhow!(
                "{}: not valid TOML: {}",
                path.display(),
                one_line(&e.to_string())
            )
        })?;
        // Only `RUNNER_<SECTION>__<KEY>` of the file's sections: CI systems set plain RUNNER_* variables
        // of their own (GitHub Actions: RUNNER_OS, RUNNER_TEMP, RUNNER_NAME…) that must not become keys.
        let mut fig = Figment::new().merge(Toml::file(path)).merge(
            Env::prefixed("RUNNER_").split("__").filter(|key| {
                // The key as `split` left it, before lowercasing: `RESOURCES.MAX_PARALLEL`.
                key.as_str().split_once('.').is_some_and(|(section, _)| {
                    ["base", "sweep", "resources", "data", "early_stop"]
                        .iter()
                        .any(|s| section.eq_ignore_ascii_case(s))
                })
            }),
        );
        for kv in sets {
            let (key, value) = engine::train::config::parse_set(kv)?;
            if !key.contains('.') {
                bail!("--set {kv}: name the section too, e.g. base.{key}=… or resources.{key}=…");
            }
            fig = fig.merge(figment::providers::Serialized::default(&key, value));
        }
        // A relative `[data] dir` written in the file is relative to the file (as Cargo and docker-compose
        // read paths); one given by RUNNER_DATA__DIR or --set stays relative to the working folder.
        let dir_from_file = fig
            .find_metadata("data.dir")
            .and_then(|m| m.source.as_ref())
            .is_some_and(|s| matches!(s, figment::Source::File(_)));
        let mut file: SweepFile = fig.extract().map_err(|e| {
            anyhow!(
                "{}: {}",
                path.display(),
                engine::train::config::describe_config_error(e, Some("--set"))
            )
        })?;
        if dir_from_file && file.data.dir.is_relative() {
            let base = path.parent().unwrap_or(Path::new(""));
            file.data.dir = base.join(&file.data.dir);
        }
        if file.name.trim().is_empty() {
            file.name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "sweep".into());
        }
        Ok(file)
    }
}

impl Sweep {
    /// Parse, validate and expand `path`. Nothing launches when this fails; the error names the file, the
    /// key and the reason. `vocab_size` is the vocab of the data dir (validated by the caller).
    pub fn from_file(path: &Path, vocab_size: usize) -> Result<Self> {
        let spec = SweepFile::load(path)?;
        Self::from_spec(path, spec, vocab_size)
    }

    pub fn from_spec(path: &Path, spec: SweepFile, vocab_size: usize) -> Result<Self> {
        let f = path.display();
        if spec.name.trim().is_empty() {
            bail!("{f}: name is empty: give the sweep a name");
        }
        let known = engine::train::config::known_keys();
        let unknown = |key: &str| engine::train::config::suggest(key, &known);
        for key in spec.base.keys() {
            if !known.contains(key) {
                bail!("{f}: [base] {key}: unknown key ({})", unknown(key));
            }
            if key == "data_dir" {
                bail!("{f}: [base] data_dir: set the data in [data] dir instead");
            }
        }
        let strategy = match spec.sweep.get("strategy") {
            None => Strategy::Grid,
            Some(toml::Value::String(s)) if s == "grid" => Strategy::Grid,
            Some(toml::Value::String(s)) if s == "random" => Strategy::Random,
            Some(toml::Value::String(s)) if s == "tpe" => Strategy::Tpe,
            Some(toml::Value::String(s)) if s == "isoflop" => Strategy::IsoFlop,
            Some(other) => {
                bail!("{f}: [sweep] strategy: {other} is not \"grid\", \"random\", \"tpe\" or \"isoflop\"")
            }
        };
        let isoflop = match strategy {
            Strategy::IsoFlop => Some(IsoFlop::parse(&f.to_string(), &spec.sweep, &spec.base)?),
            _ => {
                if let Some(k) = ISOFLOP_KEYS.iter().find(|k| spec.sweep.contains_key(**k)) {
                    bail!("{f}: [sweep] {k}: only strategy = \"isoflop\" takes {k}");
                }
                None
            }
        };
        if isoflop.is_some() && spec.early_stop.enabled() {
            bail!(
                "{f}: strategy = \"isoflop\" trains every cell to its budget: remove [early_stop]"
            );
        }
        let mut axes = Vec::new();
        for (key, value) in &spec.sweep {
            // `seed = 3` steers random sampling; `seed = [0, 1, 2]` sweeps the engine's seed.
            if (SWEEP_CONTROL.contains(&key.as_str()) && !value.is_array())
                || ISOFLOP_KEYS.contains(&key.as_str())
            {
                continue;
            }
            // `variants = [{ mixer = "ttt", weights = "ternary" }, { mixer = "attention", weights = "float" }]`:
            // settings that go together, one axis of the grid (a variant's keys are set as one).
            if key == VARIANTS {
                let variants = value
                    .as_array()
                    .filter(|v| !v.is_empty() && v.iter().all(|x| x.is_table()))
                    .ok_or_else(|| anyhow!("{f}: [sweep] variants: give a list of tables of settings, e.g. variants = [{{ mixer = \"ttt\", weights = \"ternary\" }}, {{ mixer = \"attention\", weights = \"float\" }}]"))?;
                for v in variants {
                    for (k, _) in v.as_table().expect("checked") {
                        if !known.contains(k) {
                            bail!("{f}: [sweep] variants: {k}: unknown key ({})", unknown(k));
                        }
                        if spec.sweep.contains_key(k) {
                            bail!("{f}: [sweep] variants: {k} is also swept on its own: set it in one place");
                        }
                    }
                }
                axes.push((key.clone(), Axis::Choice(variants.clone())));
                continue;
            }
            if !known.contains(key) {
                bail!("{f}: [sweep] {key}: unknown key ({})", unknown(key));
            }
            if key == "data_dir" {
                bail!("{f}: [sweep] data_dir: sweeping the data dir is not supported; make one sweep per data dir");
            }
            if let toml::Value::Table(t) = value {
                let axis = parse_range(key, t).map_err(|e| anyhow!("{f}: [sweep] {key}: {e}"))?;
                if matches!(strategy, Strategy::Grid | Strategy::IsoFlop) {
                    bail!("{f}: [sweep] {key}: a range needs strategy = \"random\" or \"tpe\"; for a grid (or an isoflop study), list the values, e.g. {key} = [a, b, c]");
                }
                axes.push((key.clone(), axis));
                continue;
            }
            let toml::Value::Array(values) = value else {
                bail!("{f}: [sweep] {key}: must be a list of values, e.g. {key} = [{value}], or a range, e.g. {key} = {{ uniform = [lo, hi] }}");
            };
            if values.is_empty() {
                bail!("{f}: [sweep] {key}: the list is empty: give at least one value");
            }
            if let Some((i, v)) = values
                .iter()
                .enumerate()
                .find(|(i, v)| values[..*i].contains(v))
            {
                bail!("{f}: [sweep] {key}: {v} is listed twice (item {}): each value once, or the same run is made twice", i + 1);
            }
            axes.push((key.clone(), Axis::Choice(values.clone())));
        }
        // Combinations, without building them: a random search may span far more than it samples.
        let choices: Option<Vec<(String, Vec<toml::Value>)>> = axes
            .iter()
            .map(|(k, a)| match a {
                Axis::Choice(v) => Some((k.clone(), v.clone())),
                _ => None,
            })
            .collect();
        let total = match &choices {
            Some(c) => c
                .iter()
                .try_fold(1usize, |n, (_, v)| n.checked_mul(v.len())),
            None => None,
        };
        let gridded = matches!(strategy, Strategy::Grid | Strategy::IsoFlop);
        if gridded {
            for key in ["trials", "seed"] {
                if spec.sweep.get(key).is_some_and(|v| !v.is_array()) {
                    bail!("{f}: [sweep] {key}: only strategy = \"random\" or \"tpe\" takes {key} (to sweep the engine's seed, give a list: seed = [0, 1, 2])");
                }
            }
            if total.is_none_or(|n| n > MAX_GRID_RUNS) {
                bail!("{f}: [sweep] the grid has more than {MAX_GRID_RUNS} combinations: use strategy = \"random\" with trials = N, or fewer values");
            }
        }
        let mut combos = match (&choices, gridded) {
            (Some(c), true) => grid(c),
            _ => Vec::new(),
        };
        // A variant's settings become the run's own values.
        let flatten = |mut combo: BTreeMap<String, toml::Value>| {
            if let Some(toml::Value::Table(t)) = combo.remove(VARIANTS) {
                combo.extend(t);
            }
            combo
        };
        combos = combos.into_iter().map(flatten).collect();
        let (mut trials, mut seed) = (0, 0);
        if !gridded {
            trials = match spec.sweep.get("trials") {
                Some(toml::Value::Integer(n)) if *n <= 0 => {
                    bail!("{f}: [sweep] trials = {n}: give the number of runs to try, at least 1")
                }
                Some(toml::Value::Integer(n)) if *n as u64 > MAX_GRID_RUNS as u64 => bail!(
                    "{f}: [sweep] trials = {n}: at most {MAX_GRID_RUNS} runs per sweep (as for a grid); split the search into several sweeps"
                ),
                Some(toml::Value::Integer(n)) if *n > 0 => *n as usize,
                Some(other) => bail!("{f}: [sweep] trials: {other} is not a positive integer"),
                None => bail!("{f}: [sweep] trials: strategy = \"random\" or \"tpe\" needs trials = N"),
            };
            seed = match spec.sweep.get("seed") {
                Some(toml::Value::Integer(n)) => *n as u64,
                None | Some(toml::Value::Array(_)) => 0,
                Some(other) => bail!("{f}: [sweep] seed: {other} is not an integer"),
            };
            combos = match (&choices, strategy) {
                (Some(c), Strategy::Random) => sample_combos(c, total, trials, seed),
                (None, Strategy::Random) => sample_points(&axes, trials, seed),
                // TPE: the first points come from the prior and are checked here; the trials themselves
                // are sampled as results arrive.
                _ => sample_points(&axes, trials.min(16), seed),
            }
            .into_iter()
            .map(flatten)
            .collect();
            if total.is_some_and(|n| trials > n) && strategy == Strategy::Random {
                tracing::warn!(
                    "{f}: trials = {trials} but the space has only {} combinations: all of them run",
                    combos.len()
                );
            }
        }
        let r = &spec.resources;
        if r.max_parallel == Some(0) || r.gpus_per_run == 0 || r.procs_per_run == 0 {
            bail!(
                "{f}: [resources] max_parallel, gpus_per_run and procs_per_run must be at least 1"
            );
        }
        if r.nodes_per_run == 0 || r.poll_seconds.is_nan() || r.poll_seconds <= 0.0 {
            bail!("{f}: [resources] nodes_per_run must be at least 1 and poll_seconds above 0");
        }
        // `!(x > 0)` also catches NaN; infinity is no limit a run can be measured against.
        if let Some(m) = r.memory_gb {
            if !(m > 0.0 && m.is_finite()) {
                bail!("{f}: [resources] memory_gb = {m}: give the memory one run may use in GiB, a number above 0 (or leave it out to use the device's)");
            }
        }
        if !r.stall_seconds.is_finite() || r.stall_seconds <= 0.0 || r.stall_seconds > 1e9 {
            bail!(
                "{f}: [resources] stall_seconds = {}: must be a number of seconds above 0 (without an event that long a run counts as stalled)",
                r.stall_seconds
            );
        }
        if r.backend == Backend::Slurm {
            let per_run = if matches!(&r.devices, Devices::List(l) if l.iter().all(|d| d == "cpu"))
            {
                ("procs_per_run", r.procs_per_run)
            } else {
                ("gpus_per_run", r.gpus_per_run)
            };
            if per_run.1 % r.nodes_per_run != 0 {
                bail!(
                    "{f}: [resources] {} = {} does not spread evenly over nodes_per_run = {}",
                    per_run.0,
                    per_run.1,
                    r.nodes_per_run
                );
            }
        }
        if let Some(dir) = &r.runs_dir {
            if !dir.is_dir() {
                bail!(
                    "{f}: [resources] runs_dir {}: no such folder: create it (with Slurm, on a filesystem every node shares)",
                    dir.display()
                );
            }
        }
        if let Devices::Auto(s) = &r.devices {
            if s != "auto" {
                bail!(
                    "{f}: [resources] devices: {s:?} is not \"auto\" or a list like [\"cuda:0\"]"
                );
            }
        }
        spec.early_stop.validate(&f.to_string())?;
        let mut runs = Vec::with_capacity(combos.len());
        if strategy == Strategy::Tpe {
            // TPE's trials are sampled as results arrive: a few points of the prior check the base config
            // now. A space where every one is refused cannot work; where some are, those trials will fail
            // (each recorded with its values and the reason) while the search goes on.
            let checked = combos.len();
            let refused: Vec<anyhow::Error> = combos
                .iter()
                .filter_map(|p| plan_config(&spec, path, vocab_size, p).err())
                .collect();
            if let Some(first) = refused.first() {
                if refused.len() == checked {
                    bail!("{first:#}");
                }
                eprintln!(
                    "warning: {} of {checked} points drawn from the search space are refused by the engine, e.g. {}: such trials fail and the search goes on",
                    refused.len(),
                    engine::error_line(first)
                );
            }
        } else if let Some(iso) = &isoflop {
            let plan = isoflop::plan(iso, &spec, path, vocab_size, &combos)?;
            for line in &plan.skipped {
                eprintln!("{f}: {line}");
            }
            runs.extend(plan.cells.into_iter().map(|c| PlannedRun {
                params: c.params,
                config: c.config,
                budget: Some(c.budget),
                fork: c.fork,
            }));
        } else {
            for params in combos {
                let config = plan_config(&spec, path, vocab_size, &params)?;
                runs.push(PlannedRun {
                    params,
                    config,
                    budget: None,
                    fork: None,
                });
            }
        }
        Ok(Self {
            file: path.to_path_buf(),
            spec,
            strategy,
            runs,
            space: axes,
            trials,
            seed,
            vocab: vocab_size,
            isoflop,
        })
    }
}

/// The engine config of one run of `spec` with the swept `params`, checked as the launch would check it:
/// the config, the model at the data's vocab, the split of the batch over the ranks, and the rungs of
/// early stopping. The error names the file and the run's values.
pub fn plan_config(
    spec: &SweepFile,
    path: &Path,
    vocab_size: usize,
    params: &BTreeMap<String, toml::Value>,
) -> Result<TrainConfig> {
    let f = path.display();
    let r = &spec.resources;
    let data_dir = std::path::absolute(&spec.data.dir).unwrap_or_else(|_| spec.data.dir.clone());
    let mut table = spec.base.clone();
    for (k, v) in params {
        match (k.as_str(), v) {
            // A TPE point carries its variant as one value.
            (VARIANTS, toml::Value::Table(t)) => table.extend(t.clone()),
            _ => {
                table.insert(k.clone(), v.clone());
            }
        }
    }
    table.insert(
        "data_dir".into(),
        toml::Value::String(data_dir.display().to_string()),
    );
    let describe = || {
        params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let config =
        TrainConfig::from_table(&table).map_err(|e| anyhow!("{f}: run ({}): {e}", describe()))?;
    config
        .validate()
        .map_err(|e| anyhow!("{f}: run ({}): {e}", describe()))?;
    config
        .model_config(vocab_size)
        .validate()
        .map_err(|e| anyhow!("{f}: run ({}): {e}", describe()))?;
    // Each rank takes an equal slice of every batch: check it for every rank count the run may
    // get (CPU ranks, GPU ranks, or both with devices = "auto"), so that --dry-run fails what the
    // launch would.
    for (ranks, name) in rank_counts(r) {
        config
            .check_ranks(ranks, name)
            .map_err(|e| anyhow!("{f}: run ({}): {e}", describe()))?;
    }
    if spec.early_stop.enabled() {
        let rungs = spec
            .early_stop
            .rungs_of(&config)
            .map_err(|e| anyhow!("{f}: run ({}): {e}", describe()))?;
        if rungs.is_empty() {
            bail!(
                "{f}: run ({}): [early_stop] min_budget = {} is not below the run's length: lower it or lengthen the runs",
                describe(),
                spec.early_stop.min_budget
            );
        }
    }
    Ok(config)
}

/// The rank counts a run of `r` may be launched with, each named by its key.
fn rank_counts(r: &Resources) -> Vec<(usize, &'static str)> {
    let cpu = (r.procs_per_run, "procs_per_run");
    let gpu = (r.gpus_per_run, "gpus_per_run");
    match &r.devices {
        Devices::List(l) if l.iter().all(|d| d == "cpu") => vec![cpu],
        Devices::List(_) => vec![gpu],
        Devices::Auto(_) => vec![cpu, gpu],
    }
}

/// Make sure `[data] dir` holds a build with the right vocab; build it from a synthetic corpus when it is
/// missing and `synth_stories` is set. Returns the data's vocab size.
pub fn ensure_data(file: &Path, data: &DataSection) -> Result<usize> {
    let f = file.display();
    let dir = &data.dir;
    if !dir.join("meta.json").is_file() {
        match data.synth_stories {
            Some(stories) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("{f}: creating [data] dir {}", dir.display()))?;
                // Runners started together on one home: one writes the corpus and builds, the
                // others wait for it and find the build done.
                let _lock = data_prep::lock_dir(dir, ".synth.lock")
                    .map_err(|e| anyhow!("{f}: [data] dir {}: {e}", dir.display()))?;
                if !dir.join("meta.json").is_file() {
                    eprintln!("{}: building synthetic data ({stories} stories) into {}", f, dir.display());
                    let corpus = dir.join("synth.txt");
                    data_prep::synth(&corpus, stories, 0).context("writing the synthetic corpus")?;
                    let mut opts = data_prep::BuildOptions::new(vec![corpus], dir);
                    opts.vocab_size = data.vocab_size.unwrap_or(1024);
                    data_prep::build(&opts)
                        .map_err(|e| anyhow!("{f}: building {}: {e}", dir.display()))?;
                }
            }
            None => bail!(
                "{f}: [data] dir {}: no data_prep build there: run `data_prep build --input FILE --out {}` (or `data_prep tinystories --out {}`)",
                dir.display(),
                dir.display(),
                dir.display()
            ),
        }
    }
    let meta = data_prep::Meta::load(dir)
        .map_err(|e| anyhow!("{f}: [data] dir {}: {e}", dir.display()))?;
    if let Some(want) = data.vocab_size {
        // Either the size asked of the tokenizer trainer or the size it reached (a small corpus may stop short).
        let requested = meta.tokenizer.settings.vocab_size_requested;
        if want != meta.vocab_size && want != requested {
            bail!(
                "{f}: [data] vocab_size = {want} but {} was built with vocab {} (requested {requested}): rebuild the data or fix vocab_size",
                dir.display(),
                meta.vocab_size
            );
        }
    }
    Ok(meta.vocab_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("s.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    const OK: &str = "name = \"t\"\n[data]\ndir = \"d\"\n[base]\ndim = 32\nn_heads = 2\nsteps = 5\n[sweep]\nbatch_size = [4, 8]\ncontext_len = [16, 32]\nn_layers = [1, 2]\n";

    #[test]
    fn grid_expands_to_the_product() {
        let d = tempfile::tempdir().unwrap();
        let s = Sweep::from_file(&write(d.path(), OK), 100).unwrap();
        assert_eq!(s.runs.len(), 8);
        assert_eq!(s.runs[0].config.dim, 32);
        let distinct: std::collections::HashSet<_> =
            s.runs.iter().map(|r| format!("{:?}", r.params)).collect();
        assert_eq!(distinct.len(), 8);
    }

    #[test]
    fn variants_set_their_keys_together() {
        let d = tempfile::tempdir().unwrap();
        let text = "name = \"t\"\n[data]\ndir = \"d\"\n[base]\ndim = 32\nn_heads = 2\nsteps = 5\n[sweep]\nn_layers = [1, 2]\n\
                    variants = [{ mixer = \"ttt\", weights = \"ternary\" }, { mixer = \"attention\", weights = \"float\" }]\n";
        let s = Sweep::from_file(&write(d.path(), text), 100).unwrap();
        assert_eq!(s.runs.len(), 4);
        let pairs: std::collections::BTreeSet<String> = s
            .runs
            .iter()
            .map(|r| format!("{} {}", r.config.mixer, r.config.weights))
            .collect();
        assert_eq!(
            pairs.into_iter().collect::<Vec<_>>(),
            vec!["attention float", "ttt ternary"]
        );
        assert!(s
            .runs
            .iter()
            .all(|r| !r.params.contains_key("variants") && r.params.contains_key("mixer")));
        let bad = text.replace("weights = \"float\"", "wieghts = \"float\"");
        let e = Sweep::from_file(&write(d.path(), &bad), 100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("variants: wieghts: unknown key"), "{e}");
    }

    #[test]
    fn random_samples_without_replacement_deterministically() {
        let d = tempfile::tempdir().unwrap();
        let text = OK.replace(
            "[sweep]\n",
            "[sweep]\nstrategy = \"random\"\ntrials = 3\nseed = 4\n",
        );
        let a = Sweep::from_file(&write(d.path(), &text), 100).unwrap();
        let b = Sweep::from_file(&write(d.path(), &text), 100).unwrap();
        assert_eq!(a.runs.len(), 3);
        assert_eq!(a.runs, b.runs);
        // Distinct runs, each a point of the grid.
        let grid = Sweep::from_file(&write(d.path(), OK), 100).unwrap();
        for (i, r) in a.runs.iter().enumerate() {
            assert!(grid.runs.iter().any(|g| g.params == r.params));
            assert!(a.runs[..i].iter().all(|o| o.params != r.params));
        }
        // More trials than combinations: every combination once.
        let all = OK.replace(
            "[sweep]\n",
            "[sweep]\nstrategy = \"random\"\ntrials = 1000\n",
        );
        let all = Sweep::from_file(&write(d.path(), &all), 100).unwrap();
        assert_eq!(all.runs.len(), grid.runs.len());
        // A space of 10^30 combinations is sampled without being built.
        let combos = sample_combos(
            &(0..30)
                .map(|i| (format!("k{i}"), (0..10).map(toml::Value::Integer).collect()))
                .collect::<Vec<_>>(),
            None,
            5,
            1,
        );
        assert_eq!(combos.len(), 5);
    }

    #[test]
    fn paths_typos_and_per_rank_memory() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        let p = d.path().join("sub").join("s.toml");
        std::fs::write(&p, OK.replace("dir = \"d\"", "dir = \"../data\"")).unwrap();
        // A relative [data] dir in the file is relative to the file, not to the working folder.
        let spec = SweepFile::load(&p).unwrap();
        assert_eq!(spec.data.dir, d.path().join("sub").join("../data"));
        // ... but one given on the command line stays relative to the working folder.
        let spec = SweepFile::load_with(&p, &["data.dir=\"x\"".into()]).unwrap();
        assert_eq!(spec.data.dir, Path::new("x"));
        // A typo'd key gets a suggestion, not the list of every key.
        let err = Sweep::from_file(&write(d.path(), &OK.replace("dim = 32", "dimm = 32")), 100)
            .unwrap_err()
            .to_string();
        assert!(err.contains("did you mean `dim`?"), "{err}");
        // The memory estimate of a data-parallel run is for one rank's slice of the batch.
        let s = Sweep::from_file(&write(d.path(), OK), 100).unwrap();
        let cfg = &s
            .runs
            .iter()
            .find(|r| r.config.batch_size == 8)
            .unwrap()
            .config;
        let model = cfg.model_config(100);
        assert!(cfg.training_memory_estimate(&model, 2) < cfg.training_memory_estimate(&model, 1));
        assert_eq!(cfg.micro_batch(2), 4);
    }

    #[test]
    fn a_list_of_seeds_is_swept() {
        let d = tempfile::tempdir().unwrap();
        let text = OK.replace("n_layers = [1, 2]", "seed = [0, 1, 2]");
        let s = Sweep::from_file(&write(d.path(), &text), 100).unwrap();
        assert_eq!(s.runs.len(), 12);
        assert_eq!(s.runs[1].config.seed, 1);
    }

    #[test]
    fn flags_override_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), OK);
        let spec = SweepFile::load_with(
            &p,
            &["resources.max_parallel=5".into(), "base.steps=9".into()],
        )
        .unwrap();
        assert_eq!(spec.resources.max_parallel, Some(5));
        assert_eq!(spec.base["steps"].as_integer(), Some(9));
        assert!(SweepFile::load_with(&p, &["steps=9".into()]).is_err());
        // A misspelt flag names the key and the flag, not this crate's source.
        let err = SweepFile::load_with(&p, &["resources.max_paralel=5".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("resources.max_paralel") && err.contains("--set") && !err.contains(".rs:"),
            "{err}"
        );
        // Without `name` the sweep is named after its file.
        std::fs::write(&p, OK.replace("name = \"t\"", "")).unwrap();
        assert_eq!(SweepFile::load(&p).unwrap().name, "s");
    }

    #[test]
    fn bad_files_name_the_key_and_reason() {
        let d = tempfile::tempdir().unwrap();
        let cases = [
            (
                OK.replace("n_layers = [1, 2]", "n_layerz = [1, 2]"),
                "n_layerz",
            ),
            (OK.replace("n_layers = [1, 2]", "n_layers = []"), "empty"),
            (
                OK.replace("n_layers = [1, 2]", "n_layers = 2"),
                "must be a list",
            ),
            (OK.replace("dim = 32", "dimm = 32"), "dimm"),
            (
                OK.replace("n_layers = [1, 2]", "n_layers = [0]"),
                "n_layers",
            ),
            (
                OK.replace("batch_size = [4, 8]", "batch_size = [4, \"x\"]"),
                "batch_size",
            ),
            (
                OK.replace("name = \"t\"", "name = \"t\"\nbogus = 1"),
                "bogus",
            ),
            (
                OK.replace("[sweep]", "[sweep]\nstrategy = \"random\""),
                "trials",
            ),
            ("name = [".to_string(), "not valid TOML"),
            // Grid misuse.
            (
                OK.replace("n_layers = [1, 2]", "n_layers = [1, 2, 1]"),
                "listed twice",
            ),
            (
                OK.replace("[sweep]\n", "[sweep]\ntrials = 3\n"),
                "only strategy = \"random\"",
            ),
            (
                OK.replace("[sweep]\n", "[sweep]\nseed = 3\n"),
                "only strategy = \"random\"",
            ),
        ];
        for (text, needle) in cases {
            let err = Sweep::from_file(&write(d.path(), &text), 100)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(needle) && err.contains("s.toml"),
                "{needle}: {err}"
            );
            assert!(!err.contains('\n'), "{err}");
        }
    }
}
