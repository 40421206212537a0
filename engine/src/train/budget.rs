//! Budgets a run is measured in — steps, training tokens or training seconds — and `--pause-at`, the
//! runner's instruction to stop a run at an early-stopping rung (eval, checkpoint, `paused` event, exit 0).

use std::str::FromStr;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::TrainConfig;

/// The unit of a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BudgetUnit {
    Steps,
    /// Training tokens (the global batch): the fair unit across batch sizes and context lengths.
    #[default]
    Tokens,
    Seconds,
}

impl BudgetUnit {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetUnit::Steps => "steps",
            BudgetUnit::Tokens => "tokens",
            BudgetUnit::Seconds => "seconds",
        }
    }

    /// How much of the budget a run at (`step`, `tokens`, `elapsed_s`) has used.
    pub fn used(self, step: u64, tokens: u64, elapsed_s: f64) -> f64 {
        match self {
            BudgetUnit::Steps => step as f64,
            BudgetUnit::Tokens => tokens as f64,
            BudgetUnit::Seconds => elapsed_s,
        }
    }

    /// A run's full length in this unit, where its config fixes one: `steps`, `max_tokens` or
    /// `max_seconds` (steps and tokens convert through the batch), whichever ends the run first.
    pub fn full_length(self, cfg: &TrainConfig) -> Option<f64> {
        let per_step = (cfg.batch_size * cfg.context_len) as f64;
        match self {
            BudgetUnit::Steps => cfg.schedule_horizon().map(|s| s as f64),
            BudgetUnit::Tokens => cfg.schedule_horizon().map(|s| s as f64 * per_step),
            BudgetUnit::Seconds => cfg.max_seconds,
        }
    }
}

impl FromStr for BudgetUnit {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "steps" => BudgetUnit::Steps,
            "tokens" => BudgetUnit::Tokens,
            "seconds" => BudgetUnit::Seconds,
            other => bail!("{other:?} is not a budget unit: use steps, tokens or seconds"),
        })
    }
}

/// `--pause-at UNIT=VALUE`: stop once the run has used `value` of `unit`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PauseAt {
    pub unit: BudgetUnit,
    pub value: f64,
}

impl PauseAt {
    pub fn reached(&self, step: u64, tokens: u64, elapsed_s: f64) -> bool {
        self.unit.used(step, tokens, elapsed_s) >= self.value
    }
}

impl std::fmt::Display for PauseAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.unit.as_str(), self.value)
    }
}

impl FromStr for PauseAt {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let Some((unit, value)) = s.split_once('=') else {
            bail!("--pause-at {s:?}: write UNIT=VALUE, e.g. --pause-at tokens=7680");
        };
        let unit: BudgetUnit = unit.trim().parse()?;
        let value: f64 = value
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("--pause-at {s:?}: {value:?} is not a number"))?;
        if !(value.is_finite() && value > 0.0) {
            bail!("--pause-at {s:?}: the budget must be a number above 0");
        }
        Ok(Self { unit, value })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_points_parse_and_are_reached() {
        let p: PauseAt = "tokens=7680".parse().unwrap();
        assert_eq!(p.to_string().parse::<PauseAt>().unwrap(), p);
        assert!(!p.reached(10, 7679, 0.0) && p.reached(10, 7680, 0.0));
        assert!("tokens".parse::<PauseAt>().is_err());
        assert!("bytes=3".parse::<PauseAt>().is_err());
        assert!("steps=-1".parse::<PauseAt>().is_err());
        let cfg = TrainConfig {
            steps: Some(100),
            batch_size: 4,
            context_len: 8,
            ..TrainConfig::default()
        };
        assert_eq!(BudgetUnit::Tokens.full_length(&cfg), Some(3200.0));
        assert_eq!(BudgetUnit::Seconds.full_length(&cfg), None);
    }
}
