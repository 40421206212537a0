//! `runner bench-sampler`: the sweep samplers on standard synthetic objectives (no training), for the
//! side-by-side benchmark against Optuna (`runner/bench/tpe_vs_optuna.sh`): the best value found after
//! each budget, per seed.

use crate::search::space::Axis;
use crate::search::tpe::{self, Point, Trial};

/// A synthetic objective to minimise over its space.
pub struct Objective {
    pub name: &'static str,
    pub space: Vec<(String, Axis)>,
    pub f: fn(&Point) -> f64,
}

fn x(p: &Point, k: &str) -> f64 {
    p[k].as_float()
        .or(p[k].as_integer().map(|i| i as f64))
        .unwrap_or(f64::NAN)
}

/// A bowl in log10(lr) with its minimum 0 at lr = 1e-3, over a log-uniform range.
fn log_bowl(p: &Point) -> f64 {
    (x(p, "lr").log10() + 3.0).powi(2)
}

/// Branin-Hoo on [-5, 10] × [0, 15]; minimum 0.397887.
fn branin(p: &Point) -> f64 {
    let (x1, x2) = (x(p, "x1"), x(p, "x2"));
    let pi = std::f64::consts::PI;
    let (a, b, c, r, s, t) = (
        1.0,
        5.1 / (4.0 * pi * pi),
        5.0 / pi,
        6.0,
        10.0,
        1.0 / (8.0 * pi),
    );
    a * (x2 - b * x1 * x1 + c * x1 - r).powi(2) + s * (1.0 - t) * x1.cos() + s
}

/// Hartmann 6-D on [0, 1]^6; minimum −3.32237.
fn hartmann6(p: &Point) -> f64 {
    const ALPHA: [f64; 4] = [1.0, 1.2, 3.0, 3.2];
    const A: [[f64; 6]; 4] = [
        [10.0, 3.0, 17.0, 3.5, 1.7, 8.0],
        [0.05, 10.0, 17.0, 0.1, 8.0, 14.0],
        [3.0, 3.5, 1.7, 10.0, 17.0, 8.0],
        [17.0, 8.0, 0.05, 10.0, 0.1, 14.0],
    ];
    const P: [[f64; 6]; 4] = [
        [0.1312, 0.1696, 0.5569, 0.0124, 0.8283, 0.5886],
        [0.2329, 0.4135, 0.8307, 0.3736, 0.1004, 0.9991],
        [0.2348, 0.1451, 0.3522, 0.2883, 0.3047, 0.6650],
        [0.4047, 0.8828, 0.8732, 0.5743, 0.1091, 0.0381],
    ];
    let xs: Vec<f64> = (0..6).map(|i| x(p, &format!("x{i}"))).collect();
    -(0..4)
        .map(|i| {
            let inner: f64 = (0..6).map(|j| A[i][j] * (xs[j] - P[i][j]).powi(2)).sum();
            ALPHA[i] * (-inner).exp()
        })
        .sum::<f64>()
}

pub fn objectives() -> Vec<Objective> {
    let u = |lo, hi| Axis::Uniform { lo, hi };
    vec![
        Objective {
            name: "log_bowl",
            space: vec![("lr".into(), Axis::LogUniform { lo: 1e-5, hi: 1.0 })],
            f: log_bowl,
        },
        Objective {
            name: "branin",
            space: vec![("x1".into(), u(-5.0, 10.0)), ("x2".into(), u(0.0, 15.0))],
            f: branin,
        },
        Objective {
            name: "hartmann6",
            space: (0..6).map(|i| (format!("x{i}"), u(0.0, 1.0))).collect(),
            f: hartmann6,
        },
    ]
}

/// The best value after each of `trials` trials of `sampler` ("tpe" or "random") with `seed`.
pub fn best_curve(obj: &Objective, sampler: &str, trials: usize, seed: u64) -> Vec<f64> {
    let mut history: Vec<Trial> = Vec::new();
    let mut best = f64::INFINITY;
    let mut curve = Vec::with_capacity(trials);
    for t in 0..trials as u64 {
        let p = match sampler {
            "tpe" => tpe::suggest(&obj.space, &history, &[], seed, t),
            _ => tpe::suggest(&obj.space, &[], &[], seed, t),
        };
        let v = (obj.f)(&p);
        best = best.min(v);
        curve.push(best);
        history.push(Trial { point: p, value: v });
    }
    curve
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objectives_have_their_known_minima() {
        let at = |pairs: &[(&str, f64)]| -> Point {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), toml::Value::Float(*v)))
                .collect()
        };
        assert!(log_bowl(&at(&[("lr", 1e-3)])).abs() < 1e-12);
        assert!(
            (branin(&at(&[("x1", std::f64::consts::PI), ("x2", 2.275)])) - 0.397887).abs() < 1e-5
        );
        let h = at(&[
            ("x0", 0.20169),
            ("x1", 0.150011),
            ("x2", 0.476874),
            ("x3", 0.275332),
            ("x4", 0.311652),
            ("x5", 0.6573),
        ]);
        assert!((hartmann6(&h) + 3.32237).abs() < 1e-4);
    }
}
