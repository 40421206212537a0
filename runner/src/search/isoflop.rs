//! IsoFLOP planning (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", approach 2):
//! for each compute budget C (training FLOPs) and each model size of the sweep's lists, one run trained on
//! D = C / (FLOPs per token) tokens — its `max_tokens` — so that every run of a budget spends the same
//! compute. Cells whose D/N (tokens per parameter outside the embedding) falls below a floor are skipped
//! with the reason: such runs see too few tokens to say anything about the optimum.
//!
//! `[sweep] strategy = "isoflop"`, `budgets = [1e13, 3e13, 1e14]`, lists over size keys (`dim`,
//! `n_layers`, ...) and any other key (`weights = ["ternary", "float"]` compares groups), and
//! `min_tokens_per_param` (default 1).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Result};
use engine::train::TrainConfig;

use crate::spec::{plan_config, SweepFile};

/// The `[sweep]` keys of an IsoFLOP study.
#[derive(Debug, Clone, PartialEq)]
pub struct IsoFlop {
    /// Compute budgets, in training FLOPs, ascending.
    pub budgets: Vec<f64>,
    /// Cells with fewer tokens per (non-embedding) parameter are skipped.
    pub min_tokens_per_param: f64,
    /// With `lr_schedule = "wsd"`: each size trains its stable phase once (in its largest budget's run),
    /// and its other budgets fork from that run where their own cooldown begins.
    pub reuse: bool,
}

/// `[sweep]` keys that steer an IsoFLOP plan rather than name a swept setting.
pub const KEYS: [&str; 3] = ["budgets", "min_tokens_per_param", "reuse"];

impl IsoFlop {
    /// Read the study's keys from `[sweep]` (`f` names the file in errors).
    pub fn parse(f: &str, sweep: &toml::Table, base: &toml::Table) -> Result<Self> {
        let num = |v: &toml::Value| v.as_float().or(v.as_integer().map(|i| i as f64));
        let mut budgets: Vec<f64> = match sweep.get("budgets") {
            Some(toml::Value::Array(a)) if !a.is_empty() => a
                .iter()
                .map(|v| num(v).filter(|x| x.is_finite() && *x > 0.0))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "{f}: [sweep] budgets: give compute budgets in FLOPs, numbers above 0, e.g. budgets = [1e13, 3e13, 1e14]"
                    )
                })?,
            _ => bail!(
                "{f}: [sweep] strategy = \"isoflop\" needs budgets = [C1, C2, ...] (training FLOPs per run, e.g. [1e13, 3e13, 1e14])"
            ),
        };
        budgets.sort_by(f64::total_cmp);
        budgets.dedup();
        let min_tokens_per_param = match sweep.get("min_tokens_per_param") {
            None => 1.0,
            Some(v) => match num(v).filter(|x| x.is_finite() && *x >= 0.0) {
                Some(x) => x,
                None => bail!("{f}: [sweep] min_tokens_per_param = {v}: give a number of tokens per parameter, 0 or more"),
            },
        };
        let wsd = base.get("lr_schedule").and_then(|v| v.as_str()) == Some("wsd");
        let reuse = match sweep.get("reuse") {
            None => wsd,
            Some(toml::Value::Boolean(true)) if !wsd => bail!(
                "{f}: [sweep] reuse = true needs lr_schedule = \"wsd\" in [base]: a cosine schedule depends on each run's length, so no run can start from another's checkpoint"
            ),
            Some(toml::Value::Boolean(b)) => *b,
            Some(other) => bail!("{f}: [sweep] reuse = {other}: give true or false"),
        };
        Ok(Self {
            budgets,
            min_tokens_per_param,
            reuse,
        })
    }
}

/// One run of the plan: its swept values (with the `max_tokens` its budget buys), config and budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub params: BTreeMap<String, toml::Value>,
    pub config: TrainConfig,
    pub budget: f64,
    /// N: parameters outside the token embedding.
    pub n: u64,
    /// D: training tokens.
    pub tokens: u64,
    pub flops_per_token: f64,
    /// A fork: the index of its parent cell in the plan and the step it starts from.
    pub fork: Option<(usize, u64)>,
}

/// The plan: the cells to train, and a line for each cell skipped.
#[derive(Debug, Default)]
pub struct Plan {
    pub cells: Vec<Cell>,
    pub skipped: Vec<String>,
}

/// Plan every (budget, combination) of `combos` (the grid over the sweep's lists).
pub fn plan(
    iso: &IsoFlop,
    spec: &SweepFile,
    path: &Path,
    vocab: usize,
    combos: &[BTreeMap<String, toml::Value>],
) -> Result<Plan> {
    let f = path.display();
    for key in ["steps", "max_tokens", "max_seconds"] {
        if spec.base.contains_key(key) || combos.iter().any(|c| c.contains_key(key)) {
            bail!("{f}: {key} is set, but strategy = \"isoflop\" sets each run's length (max_tokens) from its budget: remove {key}");
        }
    }
    let mut out = Plan::default();
    for params in combos {
        let first = out.cells.len();
        // The size first (no length yet): its FLOPs per token and N.
        let sized = plan_config(spec, path, vocab, &with_tokens(params, 1))?;
        let model = sized.model_config(vocab);
        let fpt = model.flops_per_token(sized.context_len);
        let n = model.non_embedding_params() as u64;
        let per_step = (sized.batch_size * sized.context_len) as u64;
        for &budget in &iso.budgets {
            let tokens = (budget / fpt).floor() as u64;
            let describe = params
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ");
            let ratio = tokens as f64 / n.max(1) as f64;
            if tokens < per_step {
                out.skipped.push(format!(
                    "budget {budget:.3e}, {describe}: {tokens} tokens is less than one step ({per_step}): skipped"
                ));
                continue;
            }
            if ratio < iso.min_tokens_per_param {
                out.skipped.push(format!(
                    "budget {budget:.3e}, {describe}: D/N = {ratio:.2} tokens per parameter, below min_tokens_per_param = {}: skipped",
                    iso.min_tokens_per_param
                ));
                continue;
            }
            let params = with_tokens(params, tokens);
            let config = plan_config(spec, path, vocab, &params)?;
            out.cells.push(Cell {
                params,
                config,
                budget,
                n,
                tokens,
                flops_per_token: fpt,
                fork: None,
            });
        }
        if iso.reuse {
            link_forks(&mut out.cells, first);
        }
    }
    if out.cells.is_empty() {
        bail!(
            "{f}: every (budget, size) cell is below min_tokens_per_param = {} or one step: raise the budgets or list smaller sizes",
            iso.min_tokens_per_param
        );
    }
    Ok(out)
}

/// Within the cells of one size (from `first` on, ascending budgets): the largest budget's run trains the
/// stable phase; each other cell forks from it at the step its own cooldown begins. The parent is moved
/// first (a fork refers to an earlier cell).
fn link_forks(cells: &mut Vec<Cell>, first: usize) {
    let Some(parent) = cells[first..].len().checked_sub(1).map(|i| first + i) else {
        return;
    };
    let last = cells.remove(parent);
    cells.insert(first, last);
    let parent_start = cells[first].config.schedule().cooldown_start();
    for c in &mut cells[first + 1..] {
        let start = c.config.schedule().cooldown_start();
        // Reusable when the fork's cooldown begins after step 0 and no later than the parent's.
        if let (Some(s), Some(p)) = (start, parent_start) {
            if s > 0 && s <= p {
                c.fork = Some((first, s));
            }
        }
    }
}

/// Whether fork `child` has its start in place (its run dir holds the `config.toml` a fork writes last).
pub fn forked(child: &crate::store::RunRow) -> bool {
    Path::new(&child.run_dir).join("config.toml").is_file()
}

/// Materialise fork `child` of `parent` at step `at`: the parent's checkpoint there into the child's run
/// dir, the tokenizer, and last the child's resolved config (as a fresh run of it would write it), which
/// makes the engine resume it from that checkpoint.
pub fn fork(parent: &crate::store::RunRow, child: &crate::store::RunRow, at: u64) -> Result<()> {
    let (from, to) = (Path::new(&parent.run_dir), Path::new(&child.run_dir));
    std::fs::create_dir_all(to)?;
    engine::train::checkpoint::CheckpointDir::new(from).fork_into(at, to)?;
    let tokenizer = from.join("tokenizer.json");
    if tokenizer.is_file() {
        engine::train::checkpoint::write_atomic(
            &to.join("tokenizer.json"),
            &std::fs::read(&tokenizer)?,
        )?;
    }
    let table: toml::Table = child.config.parse()?;
    let mut cfg = TrainConfig::from_table(&table)?;
    cfg.resolve_model_keys(false);
    engine::train::checkpoint::write_atomic(&to.join("config.toml"), cfg.to_toml()?.as_bytes())
}

fn with_tokens(
    params: &BTreeMap<String, toml::Value>,
    tokens: u64,
) -> BTreeMap<String, toml::Value> {
    let mut p = params.clone();
    p.insert(
        "max_tokens".into(),
        toml::Value::Integer(i64::try_from(tokens).unwrap_or(i64::MAX)),
    );
    p
}
