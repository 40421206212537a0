//! The search space of a sweep file: lists of values (choices) and ranges (`uniform`, `log_uniform`,
//! `int_uniform`), the grid over lists and the seeded random draws over either.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};
use engine::train::config::KeyKind;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One axis of the search space.
#[derive(Debug, Clone, PartialEq)]
pub enum Axis {
    /// A list of values (categorical; also ordered numbers, treated as categories as Optuna does).
    Choice(Vec<toml::Value>),
    Uniform {
        lo: f64,
        hi: f64,
    },
    LogUniform {
        lo: f64,
        hi: f64,
    },
    IntUniform {
        lo: i64,
        hi: i64,
    },
}

impl Axis {
    /// A value drawn from the prior (uniform over the axis, log-uniform for log ranges).
    pub fn sample(&self, rng: &mut ChaCha8Rng) -> toml::Value {
        match self {
            Axis::Choice(v) => v[rng.gen_range(0..v.len())].clone(),
            Axis::Uniform { lo, hi } => toml::Value::Float(rng.gen_range(*lo..=*hi)),
            Axis::LogUniform { lo, hi } => {
                toml::Value::Float(rng.gen_range(lo.ln()..=hi.ln()).exp())
            }
            Axis::IntUniform { lo, hi } => toml::Value::Integer(rng.gen_range(*lo..=*hi)),
        }
    }
}

/// Most runs a grid may expand to.
pub const MAX_GRID_RUNS: usize = 100_000;

/// The combination at `index` of the grid's order (the first axis varies slowest).
pub fn combo_at(
    axes: &[(String, Vec<toml::Value>)],
    mut index: usize,
) -> BTreeMap<String, toml::Value> {
    let mut picks = vec![0; axes.len()];
    for (i, (_, values)) in axes.iter().enumerate().rev() {
        picks[i] = index % values.len();
        index /= values.len();
    }
    axes.iter()
        .zip(picks)
        .map(|((k, values), p)| (k.clone(), values[p].clone()))
        .collect()
}

/// `trials` distinct combinations drawn uniformly from the seeded stream, never materialising the space:
/// exact index sampling when it has a countable size, per-axis draws with rejection of repeats beyond.
pub fn sample_combos(
    axes: &[(String, Vec<toml::Value>)],
    total: Option<usize>,
    trials: usize,
    seed: u64,
) -> Vec<BTreeMap<String, toml::Value>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    match total {
        Some(n) if n <= 1 << 24 => rand::seq::index::sample(&mut rng, n, trials.min(n))
            .into_iter()
            .map(|i| combo_at(axes, i))
            .collect(),
        _ => {
            // More than 16M combinations: a repeat among `trials` draws is rare, and rejected.
            let mut seen = std::collections::HashSet::new();
            let mut out = Vec::with_capacity(trials);
            while out.len() < trials {
                let picks: Vec<usize> = axes
                    .iter()
                    .map(|(_, v)| rand::Rng::gen_range(&mut rng, 0..v.len()))
                    .collect();
                if seen.insert(picks.clone()) {
                    out.push(
                        axes.iter()
                            .zip(&picks)
                            .map(|((k, v), p)| (k.clone(), v[*p].clone()))
                            .collect(),
                    );
                }
            }
            out
        }
    }
}

/// A range of `[sweep]`: `{ uniform = [lo, hi] }`, `{ log_uniform = [lo, hi] }` or
/// `{ int_uniform = [lo, hi] }`, on a key that takes numbers of that kind.
pub fn parse_range(key: &str, t: &toml::Table) -> Result<Axis> {
    let (kind, bounds) = match t.iter().collect::<Vec<_>>()[..] {
        [(k, v)] => (k.as_str(), v),
        _ => bail!("a range is one of {{ uniform = [lo, hi] }}, {{ log_uniform = [lo, hi] }}, {{ int_uniform = [lo, hi] }}"),
    };
    let nums: Vec<f64> = match bounds.as_array().map(|a| a.as_slice()) {
        Some([lo, hi]) => [lo, hi]
            .iter()
            .map(|v| v.as_float().or(v.as_integer().map(|i| i as f64)))
            .collect::<Option<_>>()
            .ok_or_else(|| anyhow!("{kind}: the bounds must be numbers"))?,
        _ => bail!("{kind}: give two bounds, e.g. {kind} = [lo, hi]"),
    };
    let (lo, hi) = (nums[0], nums[1]);
    if !(lo.is_finite() && hi.is_finite() && lo < hi) {
        bail!("{kind} = [{lo}, {hi}]: need finite bounds with lo < hi");
    }
    // A draw needs the width hi − lo as a number (±1e308 overflows it to infinity).
    if !(hi - lo).is_finite() {
        bail!("{kind} = [{lo}, {hi}]: the range is wider than a number can hold: narrow it (or use log_uniform for values spanning many orders of magnitude)");
    }
    // What the key takes: a range on `mixer` or `device` is refused, a fractional range on an integer key
    // too.
    let takes = engine::train::config::key_kind(key);
    let axis = match (kind, takes) {
        (_, KeyKind::Bool) => {
            bail!("{key} takes true or false, not a number: list the values, {key} = [true, false]")
        }
        (_, KeyKind::Text) => {
            bail!("{key} takes a name, not a number: list the values, e.g. {key} = [\"a\", \"b\"]")
        }
        ("int_uniform", _) => {
            if lo.fract() != 0.0 || hi.fract() != 0.0 {
                bail!("int_uniform = [{lo}, {hi}]: the bounds must be whole numbers");
            }
            // Whole numbers an i64 holds exactly, with a width that fits too.
            const LIMIT: f64 = (1u64 << 53) as f64;
            if lo.abs() > LIMIT || hi.abs() > LIMIT {
                bail!("int_uniform = [{lo}, {hi}]: the bounds must lie within ±2^53");
            }
            Axis::IntUniform {
                lo: lo as i64,
                hi: hi as i64,
            }
        }
        ("uniform" | "log_uniform", KeyKind::Integer) => {
            bail!("{key} takes whole numbers: use {{ int_uniform = [{lo}, {hi}] }}")
        }
        ("uniform", _) => Axis::Uniform { lo, hi },
        ("log_uniform", _) if lo > 0.0 => Axis::LogUniform { lo, hi },
        ("log_uniform", _) => bail!("log_uniform = [{lo}, {hi}]: the bounds must be above 0"),
        (other, _) => {
            bail!("{other:?} is not a range: use uniform, log_uniform or int_uniform")
        }
    };
    Ok(axis)
}

/// `trials` points drawn from the axes' priors (ranges: uniform or log-uniform; lists: uniform), an exact
/// repeat drawn again.
pub fn sample_points(
    axes: &[(String, Axis)],
    trials: usize,
    seed: u64,
) -> Vec<BTreeMap<String, toml::Value>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out: Vec<BTreeMap<String, toml::Value>> = Vec::with_capacity(trials);
    for _ in 0..trials {
        for _attempt in 0..100 {
            let p: BTreeMap<String, toml::Value> = axes
                .iter()
                .map(|(k, a)| (k.clone(), a.sample(&mut rng)))
                .collect();
            if !out.contains(&p) {
                out.push(p);
                break;
            }
        }
    }
    out
}

/// Cartesian product of the swept lists, in key order.
pub fn grid(axes: &[(String, Vec<toml::Value>)]) -> Vec<BTreeMap<String, toml::Value>> {
    let mut out = vec![BTreeMap::new()];
    for (key, values) in axes {
        out = out
            .into_iter()
            .flat_map(|partial| {
                values.iter().map(move |v| {
                    let mut p = partial.clone();
                    p.insert(key.clone(), v.clone());
                    p
                })
            })
            .collect();
    }
    out
}
