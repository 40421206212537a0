//! Scaling laws fitted to finished runs (`runner scaling`), as Hoffmann et al. 2022 ("Training
//! Compute-Optimal Large Language Models") fit them, with Besiroglu et al. 2024 ("Chinchilla Scaling: A
//! replication attempt") on doing it right:
//!
//! - **Approach 2** (IsoFLOP profiles): per compute budget C, a parabola of the final validation loss in
//!   log N; its minimum is N_opt(C) (an interior minimum is required), D_opt(C) = C / FLOPs-per-token at
//!   N_opt; then N_opt ∝ C^a and D_opt ∝ C^b by least squares in log–log.
//! - **Approach 3** (parametric): L(N, D) = E + A/N^α + B/D^β, fitted on log L with a Huber loss (δ = 1e-3)
//!   over log-sum-exp parameters (a = log A, b = log B, e = log E), by L-BFGS (the `argmin` crate) from a
//!   grid of starting points, the best fit kept.
//! - **Intervals**: runs resampled with replacement (≥ 200 times), everything refitted; 2.5–97.5%
//!   percentiles.
//!
//! N is the parameter count outside the token embedding (Kaplan et al. 2020), D the training tokens, C the
//! training FLOPs (the engine's count, forward + backward).

use anyhow::{bail, Result};
use argmin::core::{CostFunction, Executor, Gradient, State};
use argmin::solver::linesearch::MoreThuenteLineSearch;
use argmin::solver::quasinewton::LBFGS;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// One finished run as the fits see it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    /// Parameters outside the token embedding.
    pub n: f64,
    /// Training tokens.
    pub d: f64,
    /// Training FLOPs spent (the run's budget when it has one).
    pub c: f64,
    /// Final validation loss.
    pub loss: f64,
}

/// The optimum of one IsoFLOP profile.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct IsoflopMin {
    pub budget: f64,
    pub n_opt: f64,
    pub d_opt: f64,
    pub loss_opt: f64,
    /// The fitted profile: loss = p0 + p1·ln N + p2·(ln N)².
    pub parabola: [f64; 3],
}

/// N_opt ∝ C^a, D_opt ∝ C^b (approach 2), with bootstrap intervals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Frontier {
    pub a: f64,
    pub a_ci: [f64; 2],
    pub b: f64,
    pub b_ci: [f64; 2],
    /// ln N_opt = a·ln C + ka; ln D_opt = b·ln C + kb.
    pub ka: f64,
    pub kb: f64,
}

/// L(N, D) = E + A/N^α + B/D^β (approach 3), with bootstrap intervals per parameter.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[allow(non_snake_case)]
pub struct Law {
    pub E: f64,
    pub A: f64,
    pub alpha: f64,
    pub B: f64,
    pub beta: f64,
    /// Intervals of E, A, alpha, B, beta.
    pub ci: std::collections::BTreeMap<String, [f64; 2]>,
}

impl Law {
    pub fn loss(&self, n: f64, d: f64) -> f64 {
        self.E + self.A / n.powf(self.alpha) + self.B / d.powf(self.beta)
    }
}

// ---------------------------------------------------------------------------------------------------
// Approach 2

/// The least-squares parabola y = p0 + p1·x + p2·x² through (x, y).
fn parabola(x: &[f64], y: &[f64]) -> Option<[f64; 3]> {
    // Normal equations of a 3×3 system, solved by Cramer's rule (well conditioned: x is centred).
    let n = x.len() as f64;
    let mx = x.iter().sum::<f64>() / n;
    let xs: Vec<f64> = x.iter().map(|v| v - mx).collect();
    let s = |k: i32| xs.iter().map(|v| v.powi(k)).sum::<f64>();
    let t = |k: i32| xs.iter().zip(y).map(|(v, w)| v.powi(k) * w).sum::<f64>();
    let m = [[n, s(1), s(2)], [s(1), s(2), s(3)], [s(2), s(3), s(4)]];
    let r = [t(0), t(1), t(2)];
    let det = |m: &[[f64; 3]; 3]| {
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    };
    let d = det(&m);
    if d.abs() < 1e-300 {
        return None;
    }
    let mut q = [0.0; 3];
    for (i, qi) in q.iter_mut().enumerate() {
        let mut mi = m;
        for row in 0..3 {
            mi[row][i] = r[row];
        }
        *qi = det(&mi) / d;
    }
    // Back from the centred x: y = q0 + q1(x − mx) + q2(x − mx)².
    Some([
        q[0] - q[1] * mx + q[2] * mx * mx,
        q[1] - 2.0 * q[2] * mx,
        q[2],
    ])
}

/// The least-squares line y = k + s·x.
fn line(x: &[f64], y: &[f64]) -> Option<(f64, f64)> {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let sxx: f64 = x.iter().map(|v| (v - mx).powi(2)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let sxy: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let s = sxy / sxx;
    Some((my - s * mx, s))
}

/// Budgets of `points` (each point's `c`, merged within 1%), ascending.
fn budgets(points: &[Point]) -> Vec<f64> {
    let mut cs: Vec<f64> = points.iter().map(|p| p.c).collect();
    cs.sort_by(f64::total_cmp);
    let mut out: Vec<f64> = Vec::new();
    for c in cs {
        if out.last().is_none_or(|l| (c / l - 1.0).abs() > 0.01) {
            out.push(c);
        }
    }
    out
}

/// Approach 2's minima, one per budget with a usable profile, and a line naming each budget without one
/// (fewer than 3 sizes, no interior minimum): the frontier is fitted to the others.
pub fn isoflop_minima(points: &[Point]) -> (Vec<IsoflopMin>, Vec<String>) {
    let (mut out, mut problems) = (Vec::new(), Vec::new());
    for budget in budgets(points) {
        match isoflop_min(points, budget) {
            Ok(m) => out.push(m),
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    (out, problems)
}

/// The minimum of the IsoFLOP profile of `budget`.
fn isoflop_min(points: &[Point], budget: f64) -> Result<IsoflopMin> {
    {
        let at: Vec<&Point> = points
            .iter()
            .filter(|p| (p.c / budget - 1.0).abs() <= 0.01)
            .collect();
        let mut sizes: Vec<f64> = at.iter().map(|p| p.n).collect();
        sizes.sort_by(f64::total_cmp);
        sizes.dedup();
        if sizes.len() < 3 {
            bail!(
                "budget {budget:.3e} has runs of {} size(s): an IsoFLOP profile needs at least 3 sizes",
                sizes.len()
            );
        }
        let x: Vec<f64> = at.iter().map(|p| p.n.ln()).collect();
        let y: Vec<f64> = at.iter().map(|p| p.loss).collect();
        let Some([c0, c1, c2]) = parabola(&x, &y) else {
            bail!("budget {budget:.3e}: the parabola through its runs is degenerate");
        };
        let (lo, hi) = (sizes[0].ln(), sizes[sizes.len() - 1].ln());
        let xmin = -c1 / (2.0 * c2);
        if !(c2 > 0.0 && xmin > lo && xmin < hi) {
            bail!(
                "budget {budget:.3e}: no interior minimum of loss over model size (the best size is at an end of {:.3e}..{:.3e}): add sizes beyond that end",
                sizes[0],
                sizes[sizes.len() - 1]
            );
        }
        // FLOPs per token grow with N: interpolated in log–log over the budget's runs.
        let lx: Vec<f64> = at.iter().map(|p| p.n.ln()).collect();
        let lf: Vec<f64> = at.iter().map(|p| (p.c / p.d).ln()).collect();
        let fpt = line(&lx, &lf).map_or((budget / at[0].d).ln(), |(k, s)| k + s * xmin);
        Ok(IsoflopMin {
            budget,
            n_opt: xmin.exp(),
            d_opt: budget / fpt.exp(),
            loss_opt: c0 + c1 * xmin + c2 * xmin * xmin,
            parabola: [c0, c1, c2],
        })
    }
}

/// The frontier's exponents from the minima (no intervals).
fn frontier_of(minima: &[IsoflopMin]) -> Result<(f64, f64, f64, f64)> {
    if minima.len() < 2 {
        bail!(
            "{} budget(s) with an IsoFLOP minimum: the frontier N_opt ∝ C^a needs at least 2 budgets (3 or more to trust it)",
            minima.len()
        );
    }
    let lc: Vec<f64> = minima.iter().map(|m| m.budget.ln()).collect();
    let ln: Vec<f64> = minima.iter().map(|m| m.n_opt.ln()).collect();
    let ld: Vec<f64> = minima.iter().map(|m| m.d_opt.ln()).collect();
    let (ka, a) = line(&lc, &ln).ok_or_else(|| anyhow::anyhow!("budgets are all equal"))?;
    let (kb, b) = line(&lc, &ld).ok_or_else(|| anyhow::anyhow!("budgets are all equal"))?;
    Ok((a, ka, b, kb))
}

// ---------------------------------------------------------------------------------------------------
// Approach 3

/// Huber loss of the residuals of log L̂ = LSE(a − α log N, b − β log D, e) against log L.
struct HuberLse<'a> {
    points: &'a [Point],
    delta: f64,
}

/// θ = [a, b, e, α, β].
fn lse_terms(t: &[f64], p: &Point) -> ([f64; 3], f64) {
    let z = [t[0] - t[3] * p.n.ln(), t[1] - t[4] * p.d.ln(), t[2]];
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
    (z, m + s.ln())
}

impl CostFunction for HuberLse<'_> {
    type Param = Vec<f64>;
    type Output = f64;
    fn cost(&self, t: &Vec<f64>) -> std::result::Result<f64, argmin::core::Error> {
        Ok(self
            .points
            .iter()
            .map(|p| huber(lse_terms(t, p).1 - p.loss.ln(), self.delta))
            .sum())
    }
}

impl Gradient for HuberLse<'_> {
    type Param = Vec<f64>;
    type Gradient = Vec<f64>;
    fn gradient(&self, t: &Vec<f64>) -> std::result::Result<Vec<f64>, argmin::core::Error> {
        let mut g = vec![0.0; 5];
        for p in self.points {
            let (z, lse) = lse_terms(t, p);
            let r = lse - p.loss.ln();
            let dh = if r.abs() <= self.delta {
                r
            } else {
                self.delta * r.signum()
            };
            // ∂LSE/∂z_i = softmax_i.
            let w: Vec<f64> = z.iter().map(|v| (v - lse).exp()).collect();
            g[0] += dh * w[0];
            g[1] += dh * w[1];
            g[2] += dh * w[2];
            g[3] += dh * w[0] * -p.n.ln();
            g[4] += dh * w[1] * -p.d.ln();
        }
        Ok(g)
    }
}

fn huber(r: f64, delta: f64) -> f64 {
    if r.abs() <= delta {
        0.5 * r * r
    } else {
        delta * (r.abs() - 0.5 * delta)
    }
}

/// L-BFGS from `start`; the parameters and the objective reached.
fn lbfgs(points: &[Point], start: Vec<f64>) -> Option<(Vec<f64>, f64)> {
    let problem = HuberLse {
        points,
        delta: 1e-3,
    };
    let solver = LBFGS::new(MoreThuenteLineSearch::new(), 7)
        .with_tolerance_grad(1e-9)
        .ok()?
        .with_tolerance_cost(1e-12)
        .ok()?;
    let res = Executor::new(problem, solver)
        .configure(|s| s.param(start).max_iters(500))
        .run()
        .ok()?;
    let state = res.state();
    let best = state.get_best_param()?.clone();
    let cost = state.get_best_cost();
    (cost.is_finite() && best.iter().all(|v| v.is_finite())).then_some((best, cost))
}

/// Hoffmann et al.'s grid of starting points (coarser in α, β, e; the best of the grid is refined).
fn starts() -> Vec<Vec<f64>> {
    let mut out = Vec::new();
    for a in [0.0, 5.0, 10.0, 15.0, 20.0, 25.0] {
        for b in [0.0, 5.0, 10.0, 15.0, 20.0, 25.0] {
            for e in [-1.0, -0.5, 0.0, 0.5, 1.0] {
                for alpha in [0.0, 0.5, 1.0, 1.5, 2.0] {
                    for beta in [0.0, 0.5, 1.0, 1.5, 2.0] {
                        out.push(vec![a, b, e, alpha, beta]);
                    }
                }
            }
        }
    }
    out
}

/// Approach 3's best fit (θ = [a, b, e, α, β]) over the starting grid: the grid's points are ranked by
/// their objective and L-BFGS runs from the best 40 of them.
fn fit_law_theta(points: &[Point], from: Option<&[f64]>) -> Option<Vec<f64>> {
    let problem = HuberLse {
        points,
        delta: 1e-3,
    };
    let mut candidates: Vec<Vec<f64>> = match from {
        Some(t) => vec![t.to_vec()],
        None => {
            let mut grid: Vec<(f64, Vec<f64>)> = starts()
                .into_iter()
                .map(|t| (problem.cost(&t).unwrap_or(f64::INFINITY), t))
                .collect();
            grid.sort_by(|x, y| x.0.total_cmp(&y.0));
            grid.into_iter().take(40).map(|(_, t)| t).collect()
        }
    };
    candidates.dedup();
    candidates
        .into_iter()
        .filter_map(|t| lbfgs(points, t))
        .min_by(|x, y| x.1.total_cmp(&y.1))
        .map(|(t, _)| t)
}

fn law_of(t: &[f64]) -> Law {
    Law {
        E: t[2].exp(),
        A: t[0].exp(),
        alpha: t[3],
        B: t[1].exp(),
        beta: t[4],
        ci: Default::default(),
    }
}

// ---------------------------------------------------------------------------------------------------
// Both, with intervals

/// Everything fitted for one group of runs.
#[derive(Debug, Clone, Serialize)]
pub struct Fit {
    pub name: String,
    pub runs: usize,
    pub isoflop: Vec<IsoflopMin>,
    pub frontier: Option<Frontier>,
    pub law: Option<Law>,
    /// Why approach 2 or 3 could not be fitted.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    pub prediction: Option<Prediction>,
}

/// The compute-optimal model at a budget: from the frontier (N, D) and the law (loss, with its interval).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Prediction {
    pub budget: f64,
    pub n_opt: f64,
    pub d_opt: f64,
    pub loss: f64,
    pub loss_ci: [f64; 2],
}

fn percentiles(mut v: Vec<f64>) -> [f64; 2] {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return [f64::NAN, f64::NAN];
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    [at(0.025), at(0.975)]
}

/// Fit approaches 2 and 3 to `points` with `resamples` bootstrap resamples (seeded), predicting at
/// `predict` FLOPs when given.
pub fn fit(name: &str, points: &[Point], resamples: usize, predict: Option<f64>) -> Fit {
    let mut problems = Vec::new();
    let (minima, skipped) = isoflop_minima(points);
    problems.extend(skipped.into_iter().map(|p| format!("approach 2: {p}")));
    let mut frontier = match frontier_of(&minima) {
        Ok((a, ka, b, kb)) => Some(Frontier {
            a,
            a_ci: [a, a],
            b,
            b_ci: [b, b],
            ka,
            kb,
        }),
        Err(e) => {
            if !minima.is_empty() {
                problems.push(format!("approach 2: {e}"));
            }
            None
        }
    };
    let theta = if points.len() >= 5 {
        fit_law_theta(points, None)
    } else {
        problems.push(format!(
            "approach 3: {} runs for a law of 5 parameters: train at least 5",
            points.len()
        ));
        None
    };
    let mut law = theta.as_deref().map(law_of);
    // The bootstrap: runs drawn with replacement, both approaches refitted (approach 3 from the full
    // fit's parameters).
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5ca1e);
    let (mut fa, mut fb) = (Vec::new(), Vec::new());
    let mut lp: [Vec<f64>; 5] = Default::default();
    let mut pred_losses = Vec::new();
    let opt_at = |f: &Frontier, c: f64| ((f.ka + f.a * c.ln()).exp(), (f.kb + f.b * c.ln()).exp());
    for _ in 0..resamples {
        let sample: Vec<Point> = (0..points.len())
            .map(|_| points[rng.gen_range(0..points.len())])
            .collect();
        if frontier.is_some() {
            if let Ok((a, _, b, _)) = frontier_of(&isoflop_minima(&sample).0) {
                fa.push(a);
                fb.push(b);
            }
        }
        if let Some(t) = &theta {
            if let Some(bt) = fit_law_theta(&sample, Some(t)) {
                let l = law_of(&bt);
                for (i, v) in [l.E, l.A, l.alpha, l.B, l.beta].into_iter().enumerate() {
                    lp[i].push(v);
                }
                if let (Some(c), Some(f)) = (predict, &frontier) {
                    let (n, d) = opt_at(f, c);
                    pred_losses.push(l.loss(n, d));
                }
            }
        }
    }
    if let Some(f) = &mut frontier {
        if !fa.is_empty() {
            f.a_ci = percentiles(fa);
            f.b_ci = percentiles(fb);
        }
    }
    if let Some(l) = &mut law {
        for (i, k) in ["E", "A", "alpha", "B", "beta"].into_iter().enumerate() {
            l.ci.insert(k.into(), percentiles(std::mem::take(&mut lp[i])));
        }
    }
    let prediction = match (predict, &frontier, &law) {
        (Some(c), Some(f), Some(l)) => {
            let (n, d) = opt_at(f, c);
            Some(Prediction {
                budget: c,
                n_opt: n,
                d_opt: d,
                loss: l.loss(n, d),
                loss_ci: percentiles(pred_losses),
            })
        }
        (Some(_), _, _) => {
            problems.push(
                "prediction: needs both the frontier (approach 2) and the law (approach 3)".into(),
            );
            None
        }
        _ => None,
    };
    Fit {
        name: name.into(),
        runs: points.len(),
        isoflop: minima,
        frontier,
        law,
        problems,
        prediction,
    }
}

/// The completed runs of `sweeps` with a val loss, grouped by the value of `group_by` in each run's
/// config ("all" without it), as (run id, point); and how many runs were left out (not completed).
pub async fn collect(
    store: &crate::store::RunStore,
    sweeps: &[i64],
    group_by: Option<&str>,
) -> Result<(std::collections::BTreeMap<String, Vec<(i64, Point)>>, usize)> {
    let mut groups: std::collections::BTreeMap<String, Vec<(i64, Point)>> = Default::default();
    let mut left_out = 0;
    for &s in sweeps {
        for r in store.runs(Some(s)).await? {
            let (Some(loss), Some(n), Some(fpt)) =
                (r.val_loss, r.params_non_embedding, r.flops_per_token)
            else {
                continue;
            };
            if r.status != crate::store::RunStatus::Completed || r.tokens <= 0 {
                left_out += 1;
                continue;
            }
            let group = match group_by {
                None => "all".to_string(),
                Some(key) => {
                    let cfg: toml::Table = r.config.parse().unwrap_or_default();
                    match cfg.get(key) {
                        Some(toml::Value::String(v)) => format!("{key}={v}"),
                        Some(v) => format!("{key}={v}"),
                        None => bail!(
                            "--group-by {key}: run {} has no such setting (see `engine keys`)",
                            r.id
                        ),
                    }
                }
            };
            let d = r.tokens as f64;
            groups.entry(group).or_default().push((
                r.id,
                Point {
                    n: n as f64,
                    d,
                    c: r.budget.unwrap_or(fpt * d),
                    loss,
                },
            ));
        }
    }
    Ok((groups, left_out))
}

/// Where two groups' compute-optimal losses cross.
#[derive(Debug, Clone, Serialize)]
pub struct Crossover {
    pub groups: [String; 2],
    pub flops: f64,
}

/// A run as the pictures draw it.
#[derive(Debug, Clone, Serialize)]
pub struct PointRow {
    pub group: String,
    pub run: i64,
    #[serde(flatten)]
    pub point: Point,
}

/// Every group fitted, where their optima cross, and the points (for pictures).
#[derive(Debug, Clone, Serialize)]
pub struct Fitted {
    pub groups: Vec<Fit>,
    pub crossovers: Vec<Crossover>,
    pub points: Vec<PointRow>,
}

/// Fit every group of `groups` (see [`fit`]).
pub fn fit_groups(
    groups: &std::collections::BTreeMap<String, Vec<(i64, Point)>>,
    resamples: usize,
    predict: Option<f64>,
) -> Fitted {
    let fits: Vec<Fit> = groups
        .iter()
        .map(|(name, pts)| {
            let pts: Vec<Point> = pts.iter().map(|p| p.1).collect();
            fit(name, &pts, resamples, predict)
        })
        .collect();
    let around = predict.unwrap_or_else(|| {
        fits.iter()
            .flat_map(|f| f.isoflop.iter().map(|m| m.budget))
            .fold(1.0, f64::max)
    });
    let mut crossovers = Vec::new();
    for i in 0..fits.len() {
        for j in i + 1..fits.len() {
            if let Some(c) = crossover(&fits[i], &fits[j], around) {
                crossovers.push(Crossover {
                    groups: [fits[i].name.clone(), fits[j].name.clone()],
                    flops: c,
                });
            }
        }
    }
    let points = groups
        .iter()
        .flat_map(|(g, pts)| {
            pts.iter().map(move |(run, p)| PointRow {
                group: g.clone(),
                run: *run,
                point: *p,
            })
        })
        .collect();
    Fitted {
        groups: fits,
        crossovers,
        points,
    }
}

/// The compute at which group `x`'s compute-optimal loss (its law along its frontier) falls below
/// group `y`'s, searched over 1e-3× to 1e3× of `around`; `None` when neither overtakes the other there.
pub fn crossover(x: &Fit, y: &Fit, around: f64) -> Option<f64> {
    let (fx, lx, fy, ly) = (
        x.frontier.as_ref()?,
        x.law.as_ref()?,
        y.frontier.as_ref()?,
        y.law.as_ref()?,
    );
    let at = |f: &Frontier, l: &Law, c: f64| {
        l.loss((f.ka + f.a * c.ln()).exp(), (f.kb + f.b * c.ln()).exp())
    };
    let cs: Vec<f64> = (0..=120)
        .map(|i| around * 10f64.powf(-3.0 + 6.0 * i as f64 / 120.0))
        .collect();
    let diff: Vec<f64> = cs.iter().map(|&c| at(fx, lx, c) - at(fy, ly, c)).collect();
    (1..cs.len())
        .find(|&i| diff[i - 1].signum() != diff[i].signum())
        .map(|i| (cs[i - 1] * cs[i]).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points on a known law: Chinchilla-like exponents at small scale, an IsoFLOP grid of 4 budgets ×
    /// 7 sizes, FLOPs per token 6N + a constant (so D = C / fpt).
    fn synthetic(noise: f64, seed: u64) -> Vec<Point> {
        let law = Law {
            E: 1.8,
            A: 400.0,
            alpha: 0.34,
            B: 1800.0,
            beta: 0.28,
            ci: Default::default(),
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::new();
        for c in [1e15f64, 3e15, 1e16, 3e16] {
            // Sizes around the optimum of each budget, spanning it.
            for k in -3..=3 {
                // The law's optimum with D ≈ C/(6N): N_opt = G·(C/6)^(β/(α+β)), G = (αA/(βB))^(1/(α+β)).
                let g = (0.34f64 * 400.0 / (0.28 * 1800.0)).powf(1.0 / 0.62);
                let n_center = g * (c / 6.0).powf(0.28 / 0.62);
                let n = n_center * 2f64.powi(k);
                let fpt = 6.0 * n + 1e4;
                let d = c / fpt;
                let eps: f64 = rng.gen_range(-1.0..=1.0) * noise;
                out.push(Point {
                    n,
                    d,
                    c,
                    loss: law.loss(n, d) * (1.0 + eps),
                });
            }
        }
        out
    }

    #[test]
    fn the_fits_recover_a_known_law() {
        for (noise, tol) in [(0.0, 0.05), (0.002, 0.05)] {
            let pts = synthetic(noise, 1);
            let f = fit("synthetic", &pts, 0, None);
            let law = f.law.as_ref().expect("a law");
            for (got, want, what) in [
                (law.E, 1.8, "E"),
                (law.A, 400.0, "A"),
                (law.alpha, 0.34, "alpha"),
                (law.B, 1800.0, "B"),
                (law.beta, 0.28, "beta"),
            ] {
                assert!(
                    (got / want - 1.0).abs() < tol,
                    "noise {noise}: {what} = {got}, want {want} ({law:?})"
                );
            }
            // The frontier of this law: a = β/(α+β) in the limit of D = C/(6N).
            let a = f.frontier.as_ref().expect("a frontier").a;
            let want = 0.28 / (0.34 + 0.28);
            assert!(
                (a - want).abs() < 0.02,
                "noise {noise}: a = {a}, want {want}"
            );
        }
    }

    #[test]
    fn intervals_cover_the_fit_and_the_prediction_has_one() {
        let pts = synthetic(0.002, 2);
        let f = fit("synthetic", &pts, 200, Some(1e17));
        let fr = f.frontier.unwrap();
        assert!(fr.a_ci[0] <= fr.a && fr.a <= fr.a_ci[1], "{fr:?}");
        let law = f.law.unwrap();
        assert_eq!(law.ci.len(), 5);
        let p = f.prediction.unwrap();
        assert!(p.loss_ci[0] <= p.loss && p.loss <= p.loss_ci[1], "{p:?}");
    }

    #[test]
    fn too_few_sizes_no_interior_minimum_and_one_budget_are_refused() {
        let pts = synthetic(0.0, 3);
        let two_sizes: Vec<Point> = pts
            .iter()
            .filter(|p| p.c == 1e15)
            .take(2)
            .copied()
            .collect();
        let (minima, problems) = isoflop_minima(&two_sizes);
        assert!(minima.is_empty());
        assert!(
            problems[0].contains("at least 3 sizes") && problems[0].contains("1.000e15"),
            "{problems:?}"
        );
        // Only the smaller half of the sizes: the loss falls all the way, no interior minimum; the other
        // budgets keep their minima and the frontier.
        let mut some: Vec<Point> = pts
            .iter()
            .filter(|p| p.c == 1e15)
            .take(3)
            .copied()
            .collect();
        let (_, problems) = isoflop_minima(&some);
        assert!(problems[0].contains("no interior minimum"), "{problems:?}");
        some.extend(pts.iter().filter(|p| p.c > 1e15).copied());
        let f = fit("some", &some, 0, None);
        assert_eq!(f.isoflop.len(), 3, "{:?}", f.problems);
        assert!(
            f.frontier.is_some() && f.problems.len() == 1,
            "{:?}",
            f.problems
        );
        let one: Vec<Point> = pts.iter().filter(|p| p.c == 1e15).copied().collect();
        let f = fit("one", &one, 0, None);
        assert!(f.frontier.is_none());
        assert!(
            f.problems.iter().any(|p| p.contains("at least 2 budgets")),
            "{:?}",
            f.problems
        );
    }
}
