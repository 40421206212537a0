//! The search space of a sweep (lists are choices; `uniform`, `log_uniform`, `int_uniform` ranges) and the
//! Tree-structured Parzen Estimator (Bergstra et al., "Algorithms for Hyper-Parameter Optimization", NeurIPS
//! 2011), with Optuna's `TPESampler` defaults: 10 random start-up trials, γ(n) = min(⌈0.1·n⌉, 25) trials in
//! the "good" group, a prior of weight 1, kernels in log space for log ranges, and — as Optuna does by
//! default for one objective — multivariate: each trial is a product kernel over all parameters, 24
//! candidates are drawn jointly from the good density and the one maximising l(x)/g(x) is kept. Running
//! trials count as bad ones (a constant liar), so parallel workers do not all sample the same point.
//!
//! [`suggest`] is a plain function — history in, next point out — deterministic for a seed and a trial
//! number, so a resumed sweep replays the same search.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::space::Axis;

impl Axis {
    /// The interval the kernels live in (log space for log ranges; an integer range widened by ½ on each
    /// side so that every integer has the same share), or `None` for a choice.
    fn interval(&self) -> Option<(f64, f64)> {
        match self {
            Axis::Choice(_) => None,
            Axis::Uniform { lo, hi } => Some((*lo, *hi)),
            Axis::LogUniform { lo, hi } => Some((lo.ln(), hi.ln())),
            Axis::IntUniform { lo, hi } => Some((*lo as f64 - 0.5, *hi as f64 + 0.5)),
        }
    }

    /// A value in kernel space.
    fn internal(&self, v: &toml::Value) -> Option<f64> {
        let x = match v {
            toml::Value::Integer(i) => *i as f64,
            toml::Value::Float(f) => *f,
            _ => return None,
        };
        Some(match self {
            Axis::LogUniform { .. } => x.ln(),
            _ => x,
        })
    }

    fn value_at(&self, x: f64) -> toml::Value {
        match self {
            Axis::LogUniform { lo, hi } => toml::Value::Float(x.exp().clamp(*lo, *hi)),
            Axis::IntUniform { lo, hi } => toml::Value::Integer((x.round() as i64).clamp(*lo, *hi)),
            Axis::Uniform { lo, hi } => toml::Value::Float(x.clamp(*lo, *hi)),
            Axis::Choice(_) => unreachable!("choices have no kernel space"),
        }
    }
}

impl std::fmt::Display for Axis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Axis::Choice(v) => {
                let items: Vec<String> = v.iter().map(|x| x.to_string()).collect();
                write!(f, "[{}]", items.join(", "))
            }
            Axis::Uniform { lo, hi } => write!(f, "uniform [{lo}, {hi}]"),
            Axis::LogUniform { lo, hi } => write!(f, "log_uniform [{lo}, {hi}]"),
            Axis::IntUniform { lo, hi } => write!(f, "int_uniform [{lo}, {hi}]"),
        }
    }
}

/// A point of the space: a value per axis name.
pub type Point = BTreeMap<String, toml::Value>;

/// A finished (or pruned) trial: its point and objective (lower is better).
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    pub point: Point,
    pub value: f64,
}

/// Optuna's defaults.
pub const STARTUP_TRIALS: usize = 10;
const CANDIDATES: usize = 24;
const PRIOR_WEIGHT: f64 = 1.0;

/// γ(n): how many of n trials form the good group.
fn n_below(n: usize) -> usize {
    ((0.1 * n as f64).ceil() as usize).min(25)
}

/// Optuna's weights of observations, oldest first: flat up to 25, then ramping up to the newest 25.
fn weights(n: usize) -> Vec<f64> {
    if n < 25 {
        return vec![1.0; n];
    }
    // numpy's linspace(1/n, 1, n - 25): both ends included.
    let ramp = n - 25;
    let step = |i: usize| {
        if ramp > 1 {
            i as f64 / (ramp - 1) as f64
        } else {
            0.0
        }
    };
    (0..ramp)
        .map(|i| 1.0 / n as f64 + (1.0 - 1.0 / n as f64) * step(i))
        .chain(std::iter::repeat_n(1.0, 25))
        .collect()
}

/// One axis's kernels in a mixture: per component, a normal truncated to [lo, hi] (ranges, in kernel
/// space) or a distribution over the choices.
enum Kernels {
    Numeric {
        mus: Vec<f64>,
        sigmas: Vec<f64>,
        lo: f64,
        hi: f64,
    },
    Choice(Vec<Vec<f64>>),
}

impl Kernels {
    /// As Optuna: an observation's kernel is as wide as its larger gap to a neighbour (the outer ones:
    /// their one inner gap; a lone one: its distance to the farther end), clipped to
    /// [width / min(100, n + 2), width] ("magic clip"); the prior at the centre spans the interval.
    fn numeric(obs: &[f64], lo: f64, hi: f64) -> Self {
        let width = hi - lo;
        let n = obs.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|a, b| obs[*a].total_cmp(&obs[*b]));
        let min_sigma = width / (100.0f64).min(n as f64 + 2.0);
        let mut sigmas = vec![width; n];
        for (rank, &i) in order.iter().enumerate() {
            let at = |r: usize| obs[order[r]];
            let left = if rank == 0 {
                at(0) - lo
            } else {
                at(rank) - at(rank - 1)
            };
            let right = if rank + 1 == n {
                hi - at(rank)
            } else {
                at(rank + 1) - at(rank)
            };
            let sigma = match (n, rank) {
                (1, _) => left.max(right),
                (_, 0) => right,
                (_, r) if r + 1 == n => left,
                _ => left.max(right),
            };
            sigmas[i] = sigma.clamp(min_sigma, width);
        }
        let mut mus = obs.to_vec();
        mus.push((lo + hi) / 2.0);
        sigmas.push(width);
        Kernels::Numeric {
            mus,
            sigmas,
            lo,
            hi,
        }
    }

    /// As Optuna: each observation puts weight 1 on its choice over a floor of prior_weight / k; the prior
    /// component is uniform.
    fn choice(obs: &[usize], k: usize) -> Self {
        let floor = PRIOR_WEIGHT / k as f64;
        let mut rows: Vec<Vec<f64>> = obs
            .iter()
            .map(|&c| {
                let mut r = vec![floor; k];
                r[c] += 1.0;
                let t: f64 = r.iter().sum();
                r.iter().map(|x| x / t).collect()
            })
            .collect();
        rows.push(vec![1.0 / k as f64; k]);
        Kernels::Choice(rows)
    }

    fn sample(&self, j: usize, rng: &mut ChaCha8Rng) -> f64 {
        match self {
            Kernels::Numeric {
                mus,
                sigmas,
                lo,
                hi,
            } => {
                // Rejection sampling of the truncated normal.
                for _ in 0..100 {
                    let x = mus[j] + sigmas[j] * standard_normal(rng);
                    if (*lo..=*hi).contains(&x) {
                        return x;
                    }
                }
                mus[j].clamp(*lo, *hi)
            }
            Kernels::Choice(rows) => pick(&rows[j], rng) as f64,
        }
    }

    fn log_pdf(&self, j: usize, x: f64) -> f64 {
        match self {
            Kernels::Numeric {
                mus,
                sigmas,
                lo,
                hi,
            } => {
                let (m, s) = (mus[j], sigmas[j]);
                let mass = (normal_cdf((hi - m) / s) - normal_cdf((lo - m) / s)).max(1e-12);
                let z = (x - m) / s;
                -0.5 * z * z - (s * (2.0 * std::f64::consts::PI).sqrt() * mass).ln()
            }
            Kernels::Choice(rows) => rows[j][x as usize].max(1e-300).ln(),
        }
    }
}

/// A mixture of product kernels over all axes (Optuna's multivariate TPE, its single-objective default):
/// one component per observation plus the prior.
struct Mixture {
    weights: Vec<f64>,
    axes: Vec<Kernels>,
}

impl Mixture {
    /// `obs[j][d]`: observation j's value on axis d (kernel space; a choice's index).
    fn new(space: &[(String, Axis)], obs: &[Vec<f64>]) -> Self {
        let mut weights = weights(obs.len());
        weights.push(PRIOR_WEIGHT);
        let total: f64 = weights.iter().sum();
        let axes = space
            .iter()
            .enumerate()
            .map(|(d, (_, axis))| match (axis, axis.interval()) {
                (Axis::Choice(values), _) => {
                    let idx: Vec<usize> = obs.iter().map(|o| o[d] as usize).collect();
                    Kernels::choice(&idx, values.len())
                }
                (_, Some((lo, hi))) => {
                    let xs: Vec<f64> = obs.iter().map(|o| o[d]).collect();
                    Kernels::numeric(&xs, lo, hi)
                }
                _ => unreachable!("every range has an interval"),
            })
            .collect();
        Self {
            weights: weights.iter().map(|w| w / total).collect(),
            axes,
        }
    }

    fn sample(&self, rng: &mut ChaCha8Rng) -> Vec<f64> {
        let j = pick(&self.weights, rng);
        self.axes.iter().map(|k| k.sample(j, rng)).collect()
    }

    fn log_pdf(&self, x: &[f64]) -> f64 {
        let terms: Vec<f64> = (0..self.weights.len())
            .map(|j| {
                self.weights[j].ln()
                    + self
                        .axes
                        .iter()
                        .zip(x)
                        .map(|(k, v)| k.log_pdf(j, *v))
                        .sum::<f64>()
            })
            .collect();
        let max = terms.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        max + terms.iter().map(|t| (t - max).exp()).sum::<f64>().ln()
    }
}

/// An index drawn with probabilities `p` (summing to 1).
fn pick(p: &[f64], rng: &mut ChaCha8Rng) -> usize {
    let mut u: f64 = rng.gen();
    for (i, w) in p.iter().enumerate() {
        if u < *w {
            return i;
        }
        u -= w;
    }
    p.len() - 1
}

fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    // Box–Muller.
    let u1: f64 = rng.gen::<f64>().max(1e-300);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn normal_cdf(z: f64) -> f64 {
    0.5 * (1.0 + erf(z / std::f64::consts::SQRT_2))
}

/// The error function (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7).
fn erf(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let y = 1.0
        - (((((1.061_405_429 * t - 1.453_152_027) * t) + 1.421_413_741) * t - 0.284_496_736) * t
            + 0.254_829_592)
            * t
            * (-x * x).exp();
    y.copysign(x)
}

/// The trials of a sweep as TPE sees them: completed runs by their final `metric` (val loss by default),
/// paused and pruned ones by their last rung's value (as Optuna judges pruned trials by their
/// intermediate values), queued, running and interrupted ones as pending points; failed ones not at all.
pub fn history(
    runs: &[crate::store::RunRow],
    rung_values: &[super::early_stop::RungResult],
    metric: Option<super::early_stop::Metric>,
) -> (Vec<Trial>, Vec<Point>) {
    use crate::store::RunStatus;
    let point_of = |r: &crate::store::RunRow| -> Point {
        serde_json::from_value(r.params.clone()).unwrap_or_default()
    };
    let (mut history, mut pending) = (Vec::new(), Vec::new());
    for r in runs {
        let value = match r.status {
            RunStatus::Completed => match metric {
                Some(super::early_stop::Metric::ValBpb) => r.val_bpb,
                _ => r.val_loss,
            },
            RunStatus::Pruned | RunStatus::Paused => rung_values
                .iter()
                .filter(|x| x.run == r.id)
                .max_by_key(|x| x.rung)
                .map(|x| x.value),
            RunStatus::Queued | RunStatus::Running | RunStatus::Interrupted => {
                pending.push(point_of(r));
                continue;
            }
            RunStatus::Failed | RunStatus::SkippedOom => None,
        };
        if let Some(value) = value.filter(|v| v.is_finite()) {
            history.push(Trial {
                point: point_of(r),
                value,
            });
        }
    }
    (history, pending)
}

/// The next point to try. `history`: finished and pruned trials (pruned ones with their last rung's
/// value); `pending`: points of trials still running (counted as bad: a constant liar); `trial`: this
/// trial's number, which with `seed` fixes the random stream (so a resumed sweep repeats the search).
pub fn suggest(
    axes: &[(String, Axis)],
    history: &[Trial],
    pending: &[Point],
    seed: u64,
    trial: u64,
) -> Point {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ trial.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    if history.len() < STARTUP_TRIALS {
        return axes
            .iter()
            .map(|(k, a)| (k.clone(), a.sample(&mut rng)))
            .collect();
    }
    let mut sorted: Vec<&Trial> = history.iter().collect();
    sorted.sort_by(|a, b| a.value.total_cmp(&b.value));
    let below_n = n_below(sorted.len());
    // Oldest first within each group keeps Optuna's ramp of weights by age.
    let mut below: Vec<&Point> = sorted[..below_n].iter().map(|t| &t.point).collect();
    let mut above: Vec<&Point> = sorted[below_n..].iter().map(|t| &t.point).collect();
    let order = |p: &&Point| {
        history
            .iter()
            .position(|t| &t.point == *p)
            .unwrap_or(usize::MAX)
    };
    below.sort_by_key(order);
    above.sort_by_key(order);
    above.extend(pending.iter());
    // Every point in kernel space: log for log ranges, a choice as its index.
    let encode = |p: &Point| -> Option<Vec<f64>> {
        axes.iter()
            .map(|(k, a)| match a {
                Axis::Choice(values) => values
                    .iter()
                    .position(|v| Some(v) == p.get(k))
                    .map(|i| i as f64),
                _ => a.internal(p.get(k)?),
            })
            .collect()
    };
    let obs =
        |group: &[&Point]| -> Vec<Vec<f64>> { group.iter().filter_map(|p| encode(p)).collect() };
    let (l, g) = (
        Mixture::new(axes, &obs(&below)),
        Mixture::new(axes, &obs(&above)),
    );
    let best = (0..CANDIDATES)
        .map(|_| l.sample(&mut rng))
        .map(|x| (l.log_pdf(&x) - g.log_pdf(&x), x))
        .max_by(|p, q| p.0.total_cmp(&q.0))
        .map(|p| p.1)
        .expect("candidates");
    axes.iter()
        .zip(best)
        .map(|((k, a), x)| {
            let v = match a {
                Axis::Choice(values) => values[x as usize].clone(),
                _ => a.value_at(x),
            };
            (k.clone(), v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> Vec<(String, Axis)> {
        vec![
            ("lr".into(), Axis::LogUniform { lo: 1e-4, hi: 3e-2 }),
            ("warmup_steps".into(), Axis::IntUniform { lo: 0, hi: 200 }),
            ("weight_decay".into(), Axis::Uniform { lo: 0.0, hi: 0.2 }),
            (
                "n_layers".into(),
                Axis::Choice(vec![2.into(), 4.into(), 8.into()]),
            ),
        ]
    }

    /// A bowl in log-lr with its minimum at lr = 1e-3, plus a small penalty for many layers.
    fn objective(p: &Point) -> f64 {
        let lr = p["lr"].as_float().unwrap();
        (lr.log10() + 3.0).powi(2) + p["n_layers"].as_integer().unwrap() as f64 * 0.01
    }

    #[test]
    fn samples_stay_in_bounds_and_follow_the_scale() {
        let axes = space();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let lrs: Vec<f64> = (0..2000)
            .map(|_| axes[0].1.sample(&mut rng).as_float().unwrap())
            .collect();
        assert!(lrs.iter().all(|x| (1e-4..=3e-2).contains(x)));
        // Log-uniform: about half the draws below the geometric middle (≈ 1.7e-3), not 2% as uniform.
        let below = lrs.iter().filter(|x| **x < (1e-4f64 * 3e-2).sqrt()).count();
        assert!((800..1200).contains(&below), "{below}");
        for _ in 0..500 {
            let w = axes[1].1.sample(&mut rng).as_integer().unwrap();
            assert!((0..=200).contains(&w));
        }
        assert!((0..500).all(|_| {
            let p = suggest(&axes, &[], &[], 3, 0);
            (0.0..=0.2).contains(&p["weight_decay"].as_float().unwrap())
        }));
    }

    #[test]
    fn the_search_is_deterministic_and_beats_random() {
        let axes = space();
        let run = |seed: u64, tpe: bool| -> (Vec<Point>, f64) {
            let mut history: Vec<Trial> = Vec::new();
            let mut points = Vec::new();
            for t in 0..40 {
                let p = if tpe {
                    suggest(&axes, &history, &[], seed, t)
                } else {
                    suggest(&axes, &[], &[], seed, t)
                };
                history.push(Trial {
                    value: objective(&p),
                    point: p.clone(),
                });
                points.push(p);
            }
            let best = history
                .iter()
                .map(|t| t.value)
                .fold(f64::INFINITY, f64::min);
            (points, best)
        };
        // The same seed and history give the same points (a resumed sweep replays its search).
        assert_eq!(run(7, true).0, run(7, true).0);
        assert_ne!(run(7, true).0, run(8, true).0);
        // Over 15 seeds the median best of 40 TPE trials beats 40 random ones.
        let median = |tpe: bool| {
            let mut b: Vec<f64> = (0..15).map(|s| run(s, tpe).1).collect();
            b.sort_by(f64::total_cmp);
            b[7]
        };
        let (tpe, random) = (median(true), median(false));
        assert!(tpe < random, "tpe {tpe} vs random {random}");
    }

    #[test]
    fn pending_trials_push_parallel_workers_apart() {
        let axes = vec![("x".to_string(), Axis::Uniform { lo: 0.0, hi: 1.0 })];
        let history: Vec<Trial> = (0..20)
            .map(|i| {
                let x = i as f64 / 19.0;
                Trial {
                    point: [("x".to_string(), toml::Value::Float(x))].into(),
                    value: (x - 0.3).abs(),
                }
            })
            .collect();
        let first = suggest(&axes, &history, &[], 1, 20);
        // The same trial number without and with the first point pending: the liar moves the second away.
        let again = suggest(&axes, &history, &[], 1, 20);
        assert_eq!(first, again);
        let pending = vec![first.clone(); 3];
        let second = suggest(&axes, &history, &pending, 1, 20);
        assert_ne!(first, second);
    }
}
