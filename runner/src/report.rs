//! `runner report`: one row per run as a table, CSV or JSON (`--html` writes the dashboard's page with
//! the data inlined: see [`crate::ui::offline_page`]).

use std::collections::BTreeSet;
use std::fmt::Write as _;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::store::{RunRow, RunStore};

/// One report row (also the JSON object and the CSV columns).
#[derive(Debug, Clone, Serialize)]
pub struct ReportRow {
    pub id: i64,
    pub sweep_id: String,
    pub status: String,
    pub params: serde_json::Value,
    pub step: i64,
    pub total_steps: Option<i64>,
    /// Tokens trained on so far (the global batch: every rank's).
    pub tokens: i64,
    pub val_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub val_bpb: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub wall_s: f64,
    /// The highest early-stopping rung the run reached (0 is the first); none without early stopping.
    pub rung: Option<i64>,
    /// Which sampler chose the run's values: `grid`, `random` or `tpe`.
    pub sampler: Option<String>,
    pub param_count: Option<i64>,
    /// Parameters outside the token embedding, training FLOPs per token (forward + backward) and FLOPs
    /// spent so far (tokens × FLOPs per token).
    pub params_non_embedding: Option<i64>,
    pub flops_per_token: Option<f64>,
    pub flops: Option<f64>,
    /// The compute budget of a run of an IsoFLOP study.
    pub budget: Option<f64>,
    /// The run it forked from and the step it forked at (IsoFLOP reuse).
    pub parent_id: Option<i64>,
    pub fork_step: Option<i64>,
    pub checkpoint: Option<String>,
    pub error: Option<String>,
    /// Whether the run's folder still exists (a deleted one takes its checkpoints and metrics file along).
    pub run_dir_exists: bool,
    /// Tags (`runner tag`) and note (`runner note`).
    pub tags: Vec<String>,
    pub note: Option<String>,
    /// The run's whole config: a parameter one sweep did not sweep still shows the value its run had.
    #[serde(skip)]
    pub config: toml::Table,
}

impl From<&RunRow> for ReportRow {
    fn from(r: &RunRow) -> Self {
        Self {
            id: r.id,
            sweep_id: format!("s{}", r.sweep_id),
            status: r.status.to_string(),
            params: r.params.clone(),
            step: r.step,
            total_steps: r.total_steps,
            tokens: r.tokens,
            val_loss: r.val_loss,
            best_val_loss: r.best_val_loss,
            val_bpb: r.val_bpb,
            // Averaged over the run (tokens over training seconds, evals and checkpoints included), not
            // the last logging window's rate; the window's rate until the first seconds are recorded.
            tokens_per_s: if r.wall_s > 0.0 && r.tokens > 0 {
                Some(r.tokens as f64 / r.wall_s)
            } else {
                r.tokens_per_s
            },
            wall_s: r.wall_s,
            rung: r.rung,
            sampler: r.sampler.clone(),
            param_count: r.param_count,
            params_non_embedding: r.params_non_embedding,
            flops_per_token: r.flops_per_token,
            flops: r.flops_per_token.map(|f| f * r.tokens as f64),
            budget: r.budget,
            parent_id: r.parent_id,
            fork_step: r.fork_step,
            checkpoint: r.checkpoint.clone(),
            error: r.error.clone(),
            run_dir_exists: r.run_dir.is_empty() || std::path::Path::new(&r.run_dir).is_dir(),
            tags: Vec::new(),
            note: None,
            config: r.config.parse().unwrap_or_default(),
        }
    }
}

/// Report rows of `runs`, with their tags and notes.
pub async fn rows(store: &RunStore, runs: &[RunRow]) -> Result<Vec<ReportRow>> {
    let mut notes = store.annotations().await?;
    Ok(runs
        .iter()
        .map(|r| {
            let mut row = ReportRow::from(r);
            if let Some((tags, note)) = notes.remove(&r.id) {
                row.tags = tags;
                row.note = note;
            }
            row
        })
        .collect())
}

/// Sort keys `--sort` accepts.
pub const SORT_KEYS: [&str; 6] = [
    "id",
    "val_loss",
    "best_val_loss",
    "val_bpb",
    "tokens_per_s",
    "wall_s",
];

/// Sort by a column (`SORT_KEYS`) or any run setting (`n_layers`, `lr`: swept or not); `-KEY` or
/// `KEY:desc` sorts descending. Missing values go last; ties by id.
pub fn sort_rows(rows: &mut [ReportRow], key: &str) -> Result<()> {
    let (key, desc) = match (key.strip_prefix('-'), key.strip_suffix(":desc")) {
        (Some(k), _) | (None, Some(k)) => (k, true),
        _ => (key.strip_suffix(":asc").unwrap_or(key), false),
    };
    let is_param = rows
        .iter()
        .any(|r| r.params.get(key).is_some() || r.config.contains_key(key));
    if !SORT_KEYS.contains(&key) && !is_param {
        bail!(
            "--sort {key}: not a column or a run setting of these runs; use one of {} or a setting such as n_layers (prefix - or add :desc for descending)",
            SORT_KEYS.join(", ")
        );
    }
    #[derive(PartialEq, PartialOrd)]
    enum V {
        Num(f64),
        Text(String),
    }
    let val = |r: &ReportRow| -> Option<V> {
        let num = match key {
            "id" => Some(r.id as f64),
            "val_loss" => r.val_loss,
            "best_val_loss" => r.best_val_loss,
            "val_bpb" => r.val_bpb,
            // Fastest first (descending: slowest first).
            "tokens_per_s" => r.tokens_per_s.map(|v| -v),
            "wall_s" => Some(r.wall_s),
            _ => {
                return match param_value(r, key)? {
                    toml::Value::Integer(i) => Some(V::Num(i as f64)),
                    toml::Value::Float(f) => Some(V::Num(f)),
                    toml::Value::String(s) => Some(V::Text(s)),
                    other => Some(V::Text(other.to_string())),
                }
            }
        };
        num.filter(|v| !v.is_nan()).map(V::Num)
    };
    rows.sort_by(|a, b| {
        let order = match (val(a), val(b)) {
            (Some(x), Some(y)) => {
                let o = x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal);
                if desc {
                    o.reverse()
                } else {
                    o
                }
            }
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        };
        order.then(a.id.cmp(&b.id))
    });
    Ok(())
}

/// A run's value of setting `k`: the swept one, else the one in its config.
fn param_value(r: &ReportRow, k: &str) -> Option<toml::Value> {
    match r.params.get(k) {
        Some(v) => serde_json::from_value(v.clone()).ok(),
        None => r.config.get(k).cloned(),
    }
}

/// Keys swept in these rows, in order.
fn param_keys(rows: &[ReportRow]) -> Vec<String> {
    let mut keys = BTreeSet::new();
    for r in rows {
        if let Some(o) = r.params.as_object() {
            keys.extend(o.keys().cloned());
        }
    }
    keys.into_iter().collect()
}

/// A parameter's cell: the swept value, or, for a run whose sweep did not sweep it, the value it had.
fn param_str(r: &ReportRow, k: &str) -> String {
    match param_value(r, k) {
        Some(toml::Value::String(s)) => s,
        Some(v) => v.to_string(),
        None => String::new(),
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

fn columns(rows: &[ReportRow]) -> (Vec<String>, Vec<Vec<String>>) {
    let keys = param_keys(rows);
    let rungs = rows.iter().any(|r| r.rung.is_some());
    let samplers = rows.iter().any(|r| r.sampler.as_deref() == Some("tpe"));
    let mut head: Vec<String> = vec!["id".into(), "sweep".into(), "status".into()];
    if samplers {
        head.push("sampler".into());
    }
    if rungs {
        head.push("rung".into());
    }
    head.extend(keys.iter().cloned());
    head.extend(
        [
            "step",
            "val_loss",
            "best_val_loss",
            "val_bpb",
            "tokens_per_s",
            "wall_s",
            "checkpoint",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let body = rows
        .iter()
        .map(|r| {
            let mut cells = vec![r.id.to_string(), r.sweep_id.clone(), r.status.clone()];
            if samplers {
                cells.push(r.sampler.clone().unwrap_or_else(|| "-".into()));
            }
            if rungs {
                cells.push(r.rung.map_or("-".into(), |k| k.to_string()));
            }
            cells.extend(keys.iter().map(|k| param_str(r, k)));
            cells.push(match r.total_steps {
                Some(t) => format!("{}/{t}", r.step),
                None => r.step.to_string(),
            });
            cells.push(opt(r.val_loss, 4));
            cells.push(opt(r.best_val_loss, 4));
            cells.push(opt(r.val_bpb, 4));
            cells.push(opt(r.tokens_per_s, 0));
            cells.push(format!("{:.1}", r.wall_s));
            cells.push(if r.run_dir_exists {
                r.checkpoint.clone().unwrap_or_else(|| "-".into())
            } else {
                "(run dir deleted)".into()
            });
            cells
        })
        .collect();
    (head, body)
}

/// A plain aligned text table.
pub fn table(rows: &[ReportRow]) -> String {
    let (head, body) = columns(rows);
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for row in &body {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let fmt_row = |cells: &[String], out: &mut String| {
        let line: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    };
    fmt_row(&head, &mut out);
    for row in &body {
        fmt_row(row, &mut out);
    }
    out
}

fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// CSV with the JSON's columns (`params` flattened to one column per swept key).
pub fn csv(rows: &[ReportRow]) -> String {
    let keys = param_keys(rows);
    let mut out = String::new();
    let mut head = vec!["id", "sweep_id", "status"];
    head.extend(keys.iter().map(String::as_str));
    head.extend([
        "step",
        "val_loss",
        "best_val_loss",
        "val_bpb",
        "tokens_per_s",
        "wall_s",
        "checkpoint",
        "error",
        "tokens",
        "rung",
        "sampler",
    ]);
    let _ = writeln!(out, "{}", head.join(","));
    let o = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
    for r in rows {
        let mut cells = vec![r.id.to_string(), r.sweep_id.clone(), r.status.clone()];
        cells.extend(keys.iter().map(|k| param_str(r, k)));
        cells.extend([
            r.step.to_string(),
            o(r.val_loss),
            o(r.best_val_loss),
            o(r.val_bpb),
            o(r.tokens_per_s),
            r.wall_s.to_string(),
            r.checkpoint.clone().unwrap_or_default(),
            r.error.clone().unwrap_or_default(),
            r.tokens.to_string(),
            r.rung.map(|k| k.to_string()).unwrap_or_default(),
            r.sampler.clone().unwrap_or_default(),
        ]);
        let cells: Vec<String> = cells.iter().map(|c| csv_cell(c)).collect();
        let _ = writeln!(out, "{}", cells.join(","));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, loss: Option<f64>) -> ReportRow {
        ReportRow {
            id,
            sweep_id: "s1".into(),
            status: "completed".into(),
            params: serde_json::json!({"n_layers": id, "mixer": "ttt"}),
            step: 10,
            total_steps: Some(10),
            tokens: 640,
            tags: Vec::new(),
            note: None,
            val_loss: loss,
            best_val_loss: loss,
            val_bpb: loss,
            tokens_per_s: Some(100.0),
            wall_s: 1.0,
            rung: None,
            sampler: None,
            param_count: Some(5),
            params_non_embedding: Some(3),
            flops_per_token: Some(30.0),
            flops: Some(30.0 * 640.0),
            budget: None,
            parent_id: None,
            fork_step: None,
            checkpoint: Some("a,b".into()),
            error: None,
            run_dir_exists: true,
            config: format!("n_layers = {id}\nlr = 0.00{id}\nmixer = \"ttt\"")
                .parse()
                .unwrap(),
        }
    }

    #[test]
    fn sorting_puts_missing_values_last() {
        let mut rows = vec![row(1, None), row(2, Some(3.0)), row(3, Some(2.0))];
        sort_rows(&mut rows, "val_loss").unwrap();
        assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), vec![3, 2, 1]);
        assert!(sort_rows(&mut rows, "nope").is_err());
        // Descending, and by a run setting whether swept or not.
        sort_rows(&mut rows, "-val_loss").unwrap();
        assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), vec![2, 3, 1]);
        sort_rows(&mut rows, "lr:desc").unwrap();
        assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), vec![3, 2, 1]);
        sort_rows(&mut rows, "n_layers").unwrap();
        assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1, 2, 3]);
    }

    #[test]
    fn an_unswept_parameter_shows_the_value_the_run_had() {
        let mut other = row(2, Some(1.0));
        other.params = serde_json::json!({"lr": 0.5});
        let t = table(&[row(1, Some(2.0)), other]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].contains("lr") && lines[0].contains("n_layers"),
            "{t}"
        );
        // Run 1 swept n_layers, not lr: its lr comes from its config; run 2 the other way round.
        assert!(
            lines[1].contains("0.001") && lines[2].contains("0.5"),
            "{t}"
        );
        assert!(lines[2].split_whitespace().any(|c| c == "2"), "{t}");
    }

    #[test]
    fn table_and_csv_have_param_columns() {
        let rows = vec![row(1, Some(2.0))];
        let t = table(&rows);
        assert!(t.lines().next().unwrap().contains("n_layers"));
        let c = csv(&rows);
        assert!(c.starts_with("id,sweep_id,status,mixer,n_layers,step"));
        assert!(c.contains("\"a,b\""));
    }
}
