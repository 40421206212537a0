//! Early stopping that loses nothing: asynchronous successive halving (ASHA; Li et al., "A System for
//! Massively Parallel Hyperparameter Tuning", MLSys 2020) and the median rule (Optuna's MedianPruner), with
//! runs *paused* at their rungs — an eval and a checkpoint, then `engine train --resume` when promoted — so
//! a run stopped by the rule is never lost: the sweep ends with it `pruned` and resumable.
//!
//! Rungs of a run are `min_budget · eta^k` below its full length (in steps, tokens or seconds; tokens by
//! default, so that batch sizes and context lengths compare at equal data), and the full length is the
//! last rung. ASHA: a run paused at rung k is promoted when it is in the top ⌊n_k / eta⌋ of the n_k runs
//! that have reached rung k (ties by id). Median: when its value is no worse than the median of rung k.

use anyhow::{bail, Result};
use engine::train::budget::{BudgetUnit, PauseAt};
use engine::train::TrainConfig;
use serde::{Deserialize, Serialize};

/// `[early_stop] method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    #[default]
    None,
    Asha,
    Median,
}

/// `[early_stop] metric` (minimised).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    #[default]
    ValLoss,
    ValBpb,
}

impl Metric {
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::ValLoss => "val_loss",
            Metric::ValBpb => "val_bpb",
        }
    }
}

/// The `[early_stop]` section of a sweep file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EarlyStop {
    pub method: Method,
    pub metric: Metric,
    pub budget: BudgetUnit,
    /// The first rung, in the budget's unit.
    pub min_budget: f64,
    /// eta: each rung is this many times the one before, and keeps 1/eta of the runs.
    pub reduction_factor: f64,
}

impl Default for EarlyStop {
    fn default() -> Self {
        Self {
            method: Method::None,
            metric: Metric::ValLoss,
            budget: BudgetUnit::Tokens,
            min_budget: 0.0,
            reduction_factor: 3.0,
        }
    }
}

impl EarlyStop {
    pub fn enabled(&self) -> bool {
        self.method != Method::None
    }

    /// Check the section (`f` names the file in the error).
    pub fn validate(&self, f: &str) -> Result<()> {
        if !self.enabled() {
            return Ok(());
        }
        if !(self.min_budget.is_finite() && self.min_budget > 0.0) {
            bail!(
                "{f}: [early_stop] min_budget = {}: give the first rung in {}, a number above 0",
                self.min_budget,
                self.budget.as_str()
            );
        }
        if !(self.reduction_factor.is_finite() && self.reduction_factor > 1.0) {
            bail!(
                "{f}: [early_stop] reduction_factor = {}: must be above 1 (3 keeps a third of the runs at each rung)",
                self.reduction_factor
            );
        }
        Ok(())
    }

    /// The rungs below a full length of `full`: `min_budget · eta^k` while under it.
    pub fn rungs(&self, full: f64) -> Vec<f64> {
        let mut out = Vec::new();
        let mut r = self.min_budget;
        while r < full && out.len() < 64 {
            out.push(r);
            r *= self.reduction_factor;
        }
        out
    }

    /// The rungs of a run of `cfg` (its full length must be fixed in the budget's unit). In steps or
    /// tokens a run can only pause after a whole step: rungs that fall on the same step are one rung (the
    /// largest of them), so that a tiny `min_budget` never makes a run pause again and again at one step.
    pub fn rungs_of(&self, cfg: &TrainConfig) -> Result<Vec<f64>> {
        let per_step = match self.budget {
            BudgetUnit::Steps => Some(1.0),
            BudgetUnit::Tokens => Some((cfg.batch_size * cfg.context_len).max(1) as f64),
            BudgetUnit::Seconds => None,
        };
        match self.budget.full_length(cfg) {
            Some(full) => Ok(match per_step {
                Some(per_step) => collapse_to_steps(&self.rungs(full), per_step),
                None => self.rungs(full),
            }),
            None => bail!(
                "[early_stop] budget = \"{}\" but the run's length is not set in {} (set {} in [base])",
                self.budget.as_str(),
                self.budget.as_str(),
                match self.budget {
                    BudgetUnit::Seconds => "max_seconds",
                    _ => "steps or max_tokens",
                }
            ),
        }
    }

    /// Where a run of `cfg` that has passed `rung` rungs (`None`: none yet) pauses next: its next rung;
    /// `None` when its next stop is the end of the run. An error when the run's length is not set in the
    /// budget's unit (never a launch without its rung).
    pub fn pause_at(&self, cfg: &TrainConfig, rung: Option<i64>) -> Result<Option<Pause>> {
        let next = rung.map_or(0, |r| r as usize + 1);
        Ok(self.rungs_of(cfg)?.get(next).map(|&value| Pause {
            rung: next,
            at: PauseAt {
                unit: self.budget,
                value,
            },
        }))
    }

    /// A one-line description for listings.
    pub fn describe(&self) -> String {
        let method = match self.method {
            Method::None => "none",
            Method::Asha => "ASHA",
            Method::Median => "median rule",
        };
        format!(
            "{method} on {}, runs compared at equal {} (first rung {}, reduction factor {})",
            self.metric.as_str(),
            self.budget.as_str(),
            self.min_budget,
            self.reduction_factor
        )
    }
}

/// `rungs` with those that a run reaches at the same step (the first step at or past each, `per_step` of
/// the unit a step) merged into the largest.
fn collapse_to_steps(rungs: &[f64], per_step: f64) -> Vec<f64> {
    let mut out: Vec<f64> = Vec::with_capacity(rungs.len());
    let mut last_step = None;
    for &r in rungs {
        let step = (r / per_step).ceil().max(1.0);
        if last_step == Some(step) {
            *out.last_mut().expect("a rung before") = r;
        } else {
            out.push(r);
            last_step = Some(step);
        }
    }
    out
}

/// Where a launched run stops next: rung `rung` (of its early-stopping rule, or a fork point), at `at`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pause {
    pub rung: usize,
    pub at: PauseAt,
}

/// A run's result at a rung.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RungResult {
    pub run: i64,
    pub rung: usize,
    pub value: f64,
}

/// The paused run to promote next, if any: `paused` holds (run, rung it waits at), `results` every rung
/// result so far. Higher rungs first; within a rung the best value first (ties by id).
pub fn next_promotion(
    method: Method,
    eta: f64,
    results: &[RungResult],
    paused: &[(i64, usize)],
) -> Option<i64> {
    let top_rung = paused.iter().map(|p| p.1).max()?;
    for k in (0..=top_rung).rev() {
        let mut at_k: Vec<&RungResult> = results.iter().filter(|r| r.rung == k).collect();
        at_k.sort_by(|a, b| a.value.total_cmp(&b.value).then(a.run.cmp(&b.run)));
        let waiting = |run: i64| paused.iter().any(|p| p.0 == run && p.1 == k);
        let pick = match method {
            Method::None => None,
            Method::Asha => {
                let keep = (at_k.len() as f64 / eta).floor() as usize;
                at_k.iter().take(keep).find(|r| waiting(r.run))
            }
            Method::Median => match median(&at_k.iter().map(|r| r.value).collect::<Vec<_>>()) {
                Some(median) => at_k.iter().find(|r| r.value <= median && waiting(r.run)),
                None => None,
            },
        };
        if let Some(r) = pick {
            return Some(r.run);
        }
    }
    None
}

/// The best run waiting at the highest rung any run waits at (ties by id): what a search that would end
/// with nothing completed continues, since with fewer than eta runs at a rung the rule keeps none.
pub fn best_waiting(results: &[RungResult], paused: &[(i64, usize)]) -> Option<i64> {
    let top = paused.iter().map(|p| p.1).max()?;
    results
        .iter()
        .filter(|r| r.rung == top && paused.contains(&(r.run, r.rung)))
        .min_by(|a, b| a.value.total_cmp(&b.value).then(a.run.cmp(&b.run)))
        .map(|r| r.run)
}

fn median(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replay results in arrival order; after each, promote while the rule allows (one worker, as a
    /// sweep with max_parallel = 1 runs). Returns the promotions as (run, from rung).
    fn replay(method: Method, arrivals: &[RungResult]) -> Vec<(i64, usize)> {
        let (mut results, mut paused, mut promoted) = (Vec::new(), Vec::new(), Vec::new());
        for r in arrivals {
            results.push(*r);
            paused.push((r.run, r.rung));
            while let Some(run) = next_promotion(method, 3.0, &results, &paused) {
                let i = paused.iter().position(|p| p.0 == run).unwrap();
                promoted.push(paused.remove(i));
            }
        }
        promoted
    }

    /// Results at rung 0 of runs 1, 2, … in arrival order.
    fn at_rung_0(values: &[f64]) -> Vec<RungResult> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| RungResult {
                run: i as i64 + 1,
                rung: 0,
                value: *v,
            })
            .collect()
    }

    #[test]
    fn asha_promotes_the_top_third_as_results_arrive() {
        // Hand-worked, eta = 3, nine configs at rung 0 with values v(run) arriving in this order:
        // run:   1    2    3    4    5    6    7    8    9
        // value: 5.0  4.0  6.0  3.0  7.0  2.0  8.0  1.0  9.0
        let values = [5.0, 4.0, 6.0, 3.0, 7.0, 2.0, 8.0, 1.0, 9.0];
        let arrivals = at_rung_0(&values);
        // n = 3 (5, 4, 6): keep ⌊3/3⌋ = 1 → run 2 (4.0). n = 4 (+3): keep 1 → run 4 (3.0). n = 5 (+7):
        // keep 1, run 4 already promoted. n = 6 (+2): keep 2 → run 6 (2.0). n = 7 (+8): nothing new. n = 8
        // (+1): keep 2 → run 8 (1.0). n = 9 (+9): keep 3 = runs 8, 6, 4, all promoted. Asynchronous: run 2,
        // promoted early, is not in the final top third (the price of never waiting).
        assert_eq!(
            replay(Method::Asha, &arrivals),
            vec![(2, 0), (4, 0), (6, 0), (8, 0)]
        );
        // Ties by id; nothing is promoted before eta results are in.
        let tie = [
            RungResult {
                run: 5,
                rung: 0,
                value: 1.0,
            },
            RungResult {
                run: 3,
                rung: 0,
                value: 1.0,
            },
        ];
        assert_eq!(
            next_promotion(Method::Asha, 3.0, &tie, &[(5, 0), (3, 0)]),
            None
        );
        let mut three = tie.to_vec();
        three.push(RungResult {
            run: 9,
            rung: 0,
            value: 1.0,
        });
        assert_eq!(
            next_promotion(Method::Asha, 3.0, &three, &[(5, 0), (3, 0), (9, 0)]),
            Some(3)
        );
        // A higher rung is served first.
        let mut two_rungs = three.clone();
        two_rungs.extend((10..13).map(|run| RungResult {
            run,
            rung: 1,
            value: run as f64,
        }));
        let paused = [(5, 0), (9, 0), (10, 1), (11, 1), (12, 1)];
        assert_eq!(
            next_promotion(Method::Asha, 3.0, &two_rungs, &paused),
            Some(10)
        );
    }

    #[test]
    fn median_continues_runs_no_worse_than_the_median() {
        let arrivals = at_rung_0(&[3.0, 1.0, 2.0, 5.0]);
        // 3.0 alone is its own median; 1.0 < 2.0; 2.0 = median(1, 2, 3); 5.0 > 2.5.
        assert_eq!(
            replay(Method::Median, &arrivals),
            vec![(1, 0), (2, 0), (3, 0)]
        );
    }

    #[test]
    fn rungs_lie_below_the_full_length() {
        let es = EarlyStop {
            method: Method::Asha,
            min_budget: 100.0,
            ..EarlyStop::default()
        };
        assert_eq!(es.rungs(2700.0), vec![100.0, 300.0, 900.0]);
        assert_eq!(es.rungs(900.0), vec![100.0, 300.0]);
        let cfg = TrainConfig {
            steps: Some(100),
            batch_size: 3,
            context_len: 9,
            ..TrainConfig::default()
        };
        assert_eq!(es.pause_at(&cfg, None).unwrap().unwrap().at.value, 100.0);
        assert_eq!(es.pause_at(&cfg, Some(1)).unwrap().unwrap().at.value, 900.0);
        assert_eq!(es.pause_at(&cfg, Some(2)).unwrap(), None);
        assert!(es.validate("f").is_ok());
        // A first rung far below one step: the rungs a run reaches at one step are one rung.
        let tiny = EarlyStop {
            min_budget: 1e-300,
            ..es.clone()
        };
        let rungs = tiny.rungs_of(&cfg).unwrap();
        let steps: Vec<f64> = rungs.iter().map(|r| (r / 27.0).ceil()).collect();
        let mut distinct = steps.clone();
        distinct.dedup();
        assert_eq!(steps, distinct, "one rung per step: {rungs:?}");
        assert!(
            rungs.len() < 10 && rungs.iter().all(|r| *r < 2700.0),
            "{rungs:?}"
        );
        let bad = EarlyStop {
            reduction_factor: 1.0,
            ..es
        };
        assert!(bad
            .validate("f")
            .unwrap_err()
            .to_string()
            .contains("reduction_factor"));
    }
}
