//! The search space of a sweep (lists are choices; `uniform`, `log_uniform`, `int_uniform` ranges) and the
//! Tree-structured Parzen Estimator (Bergstra et al., "Algorithms for Hyper-Parameter Optimization", NeurIPS
//! 2011), with Optuna's `TPESampler` defaults: 10 random start-up trials, γ(n) = min(⌈0.1·n⌉, 25) trials in
//! the "good" group, a prior of weight 1, kernels in log space for log ranges, 24 candidates drawn from the
//! good density and the one maximising l(x)/g(x) kept, each parameter on its own (univariate). Running trials
//! count as bad ones (a constant liar), so parallel workers do not all sample the same point.
//!
//! [`suggest`] is a plain function — history in, next point out — deterministic for a seed and a trial
//! number, so a resumed sweep replays the same search.

use std::collections::BTreeMap;

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
    let ramp = n - 25;
    (0..ramp)
        .map(|i| 1.0 / n as f64 + (1.0 - 1.0 / n as f64) * i as f64 / ramp.max(1) as f64)
        .chain(std::iter::repeat_n(1.0, 25))
        .collect()
}

/// A mixture of normals truncated to [lo, hi]: the observations plus the prior (centre, width hi − lo).
struct Parzen {
    mus: Vec<f64>,
    sigmas: Vec<f64>,
    weights: Vec<f64>,
    lo: f64,
    hi: f64,
}

impl Parzen {
    fn new(obs: &[f64], obs_weights: &[f64], lo: f64, hi: f64) -> Self {
        let width = hi - lo;
        let mut pts: Vec<(f64, f64, bool)> = obs
            .iter()
            .zip(obs_weights)
            .map(|(m, w)| (*m, *w, false))
            .collect();
        pts.push(((lo + hi) / 2.0, PRIOR_WEIGHT, true));
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let n = pts.len();
        // Each kernel as wide as its larger gap to a neighbour (the interval's ends for the outer ones),
        // clipped to [width / min(100, 1 + n), width] ("magic clip"); the prior spans the whole interval.
        let min_sigma = width / (100.0f64).min(1.0 + n as f64);
        let mut sigmas = Vec::with_capacity(n);
        for i in 0..n {
            if pts[i].2 {
                sigmas.push(width);
                continue;
            }
            let left = if i == 0 {
                pts[i].0 - lo
            } else {
                pts[i].0 - pts[i - 1].0
            };
            let right = if i + 1 == n {
                hi - pts[i].0
            } else {
                pts[i + 1].0 - pts[i].0
            };
            sigmas.push(left.max(right).clamp(min_sigma, width));
        }
        let total: f64 = pts.iter().map(|p| p.1).sum();
        Self {
            mus: pts.iter().map(|p| p.0).collect(),
            sigmas,
            weights: pts.iter().map(|p| p.1 / total).collect(),
            lo,
            hi,
        }
    }

    fn sample(&self, rng: &mut ChaCha8Rng) -> f64 {
        let mut u: f64 = rng.gen();
        let mut k = self.weights.len() - 1;
        for (i, w) in self.weights.iter().enumerate() {
            if u < *w {
                k = i;
                break;
            }
            u -= w;
        }
        // Rejection sampling of the truncated normal (every kernel keeps a fair share of its mass inside).
        for _ in 0..100 {
            let z: f64 = standard_normal(rng);
            let x = self.mus[k] + self.sigmas[k] * z;
            if (self.lo..=self.hi).contains(&x) {
                return x;
            }
        }
        self.mus[k].clamp(self.lo, self.hi)
    }

    fn log_pdf(&self, x: f64) -> f64 {
        let mut p = 0.0;
        for ((m, s), w) in self.mus.iter().zip(&self.sigmas).zip(&self.weights) {
            let mass = normal_cdf((self.hi - m) / s) - normal_cdf((self.lo - m) / s);
            let z = (x - m) / s;
            p += w * (-0.5 * z * z).exp()
                / (s * (2.0 * std::f64::consts::PI).sqrt() * mass.max(1e-12));
        }
        p.max(1e-300).ln()
    }
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
    axes.iter()
        .map(|(key, axis)| {
            let value = match axis.interval() {
                Some((lo, hi)) => {
                    let obs = |group: &[&Point]| -> Vec<f64> {
                        group
                            .iter()
                            .filter_map(|p| axis.internal(p.get(key)?))
                            .collect()
                    };
                    let (b, a) = (obs(&below), obs(&above));
                    let l = Parzen::new(&b, &weights(b.len()), lo, hi);
                    let g = Parzen::new(&a, &weights(a.len()), lo, hi);
                    let best = (0..CANDIDATES)
                        .map(|_| l.sample(&mut rng))
                        .map(|x| (l.log_pdf(x) - g.log_pdf(x), x))
                        .max_by(|p, q| p.0.total_cmp(&q.0))
                        .map(|p| p.1)
                        .unwrap_or((lo + hi) / 2.0);
                    axis.value_at(best)
                }
                None => {
                    let Axis::Choice(values) = axis else {
                        unreachable!()
                    };
                    let dist = |group: &[&Point]| -> Vec<f64> {
                        let w = weights(group.len());
                        let mut d = vec![PRIOR_WEIGHT / values.len() as f64; values.len()];
                        for (p, w) in group.iter().zip(w) {
                            if let Some(i) =
                                p.get(key).and_then(|v| values.iter().position(|x| x == v))
                            {
                                d[i] += w;
                            }
                        }
                        let total: f64 = d.iter().sum();
                        d.iter().map(|x| x / total).collect()
                    };
                    let (l, g) = (dist(&below), dist(&above));
                    let best = (0..CANDIDATES)
                        .map(|_| {
                            let mut u: f64 = rng.gen();
                            let mut i = values.len() - 1;
                            for (j, p) in l.iter().enumerate() {
                                if u < *p {
                                    i = j;
                                    break;
                                }
                                u -= p;
                            }
                            i
                        })
                        .max_by(|a, b| (l[*a] / g[*a]).total_cmp(&(l[*b] / g[*b])))
                        .unwrap_or(0);
                    values[best].clone()
                }
            };
            (key.clone(), value)
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
