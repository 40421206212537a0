//! `runner report`: one row per run as a table, CSV or JSON, and a self-contained HTML page (inline SVG)
//! with loss curves, best val loss against each swept parameter, and the table.

use std::collections::{BTreeMap, BTreeSet};
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
    pub checkpoint: Option<String>,
    pub error: Option<String>,
    /// Whether the run's folder still exists (a deleted one takes its checkpoints and metrics file along).
    pub run_dir_exists: bool,
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
            checkpoint: r.checkpoint.clone(),
            error: r.error.clone(),
            run_dir_exists: r.run_dir.is_empty() || std::path::Path::new(&r.run_dir).is_dir(),
            config: r.config.parse().unwrap_or_default(),
        }
    }
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

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// A line chart (or scatter when `points_only`) as inline SVG.
fn svg_chart(
    title: &str,
    x_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    points_only: bool,
) -> String {
    let (w, h, ml, mr, mt, mb) = (640.0, 320.0, 60.0, 150.0, 30.0, 40.0);
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    let mut svg = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">");
    let _ = write!(
        svg,
        "<text x=\"{ml}\" y=\"18\" font-size=\"13\">{}</text>",
        esc(title)
    );
    if all.is_empty() {
        svg.push_str("<text x=\"60\" y=\"160\">no data yet</text></svg>");
        return svg;
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in &all {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    if x1 - x0 < 1e-12 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    if y1 - y0 < 1e-12 {
        y0 -= 0.5;
        y1 += 0.5;
    }
    let (pw, ph) = (w - ml - mr, h - mt - mb);
    let sx = |x: f64| ml + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| mt + ph - (y - y0) / (y1 - y0) * ph;
    let _ = write!(svg, "<rect x=\"{ml}\" y=\"{mt}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#999\"/>");
    for (fy, text) in nice_ticks(y0, y1) {
        let _ = write!(
            svg,
            "<line x1=\"{ml}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{text}</text>",
            ml + pw,
            ml - 4.0,
            sy(fy) + 4.0,
            y = sy(fy)
        );
    }
    for (fx, text) in nice_ticks(x0, x1) {
        let _ = write!(
            svg,
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{mt}\" y2=\"{}\" stroke=\"#eee\"/><text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{text}</text>",
            mt + ph,
            mt + ph + 14.0,
            x = sx(fx)
        );
    }
    let _ = write!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
        ml + pw / 2.0,
        h - 6.0,
        esc(x_label)
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        if points_only {
            for (x, y) in pts {
                let _ = write!(
                    svg,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{color}\"/>",
                    sx(*x),
                    sy(*y)
                );
            }
        } else {
            let path: Vec<String> = pts
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
                .collect();
            let _ = write!(
                svg,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>",
                path.join(" ")
            );
        }
        let ly = mt + 12.0 + i as f64 * 14.0;
        if i < 18 {
            let _ = write!(svg, "<rect x=\"{}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\">{}</text>", w - mr + 8.0, ly - 9.0, w - mr + 22.0, ly, esc(name));
        }
    }
    svg.push_str("</svg>");
    svg
}

/// Axis ticks at round values (1, 2 or 5 × 10^k apart, about five of them) inside `[lo, hi]`, each with
/// its label: as many decimals as the spacing needs; axes reaching 10,000 count in `k`, a million in `M`.
fn nice_ticks(lo: f64, hi: f64) -> Vec<(f64, String)> {
    let raw = (hi - lo) / 4.0;
    if !(raw.is_finite() && raw > 0.0) {
        return vec![];
    }
    // step = m × 10^exp, m ∈ {1, 2, 5}: the round spacing nearest the raw one (on a log scale).
    let mut exp = raw.log10().floor() as i32;
    let mut m = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .min_by(|a, b| {
            let d = |s: f64| (s * 10f64.powi(exp) / raw).ln().abs();
            d(*a).total_cmp(&d(*b))
        })
        .unwrap_or(1.0);
    if m == 10.0 {
        (m, exp) = (1.0, exp + 1);
    }
    let step = m * 10f64.powi(exp);
    let top = lo.abs().max(hi.abs());
    let (div, unit, unit_exp) = if top >= 1e6 {
        (1e6, "M", 6)
    } else if top >= 1e4 {
        (1e3, "k", 3)
    } else {
        (1.0, "", 0)
    };
    // Decimals from the integer exponent (a float log10 of 0.1 may land just below -1).
    let decimals = (unit_exp - exp).max(0) as usize;
    let label = |v: f64| {
        if v.abs() < step * 1e-6 {
            "0".to_string()
        } else {
            format!("{:.decimals$}{unit}", v / div)
        }
    };
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    (first..=last)
        .map(|i| i as f64 * step)
        .map(|v| (v, label(v)))
        .collect()
}

/// The self-contained HTML report.
pub async fn html(store: &RunStore, rows: &[ReportRow], title: &str) -> Result<String> {
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let hist = store.histories(&ids).await?;
    let label = |r: &ReportRow| {
        let p: Vec<String> = param_keys(std::slice::from_ref(r))
            .iter()
            .map(|k| format!("{k}={}", param_str(r, k)))
            .collect();
        format!("{} {}", r.id, p.join(" "))
    };
    // `metric` of every run that has it, against the step scaled by `x_per_step(run)` (runs without one left out).
    let curve_by = |metric: &str, x_per_step: &dyn Fn(&ReportRow) -> Option<f64>| {
        rows.iter()
            .filter_map(|r| {
                let pts = hist.get(&r.id)?.get(metric)?;
                let k = x_per_step(r)?;
                Some((
                    label(r),
                    pts.iter().map(|(s, v)| (*s as f64 * k, *v)).collect(),
                ))
            })
            .collect::<Vec<(String, Vec<(f64, f64)>)>>()
    };
    let curve = |metric: &str| curve_by(metric, &|_| Some(1.0));
    let mut body = String::new();
    let _ = write!(body, "<h1>{}</h1>", esc(title));
    body.push_str(&svg_chart("train loss", "step", &curve("loss"), false));
    body.push_str(&svg_chart("val loss", "step", &curve("val_loss"), false));
    // Runs with another batch size or context see another number of tokens per step: compare them by
    // tokens seen as well.
    let tokens_per_step =
        |r: &ReportRow| (r.step > 0 && r.tokens > 0).then(|| r.tokens as f64 / r.step as f64);
    let by_tokens = curve_by("val_loss", &tokens_per_step);
    body.push_str(&svg_chart(
        "val loss by tokens seen",
        "tokens seen",
        &by_tokens,
        false,
    ));
    for key in param_keys(rows) {
        let mut by_value: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for r in rows {
            let Some(best) = r.best_val_loss else {
                continue;
            };
            let x = r.params.get(&key).and_then(|v| v.as_f64());
            match x {
                Some(x) => by_value.entry("runs".into()).or_default().push((x, best)),
                None => by_value
                    .entry(param_str(r, &key))
                    .or_default()
                    .push((0.0, best)),
            }
        }
        let series: Vec<_> = by_value.into_iter().collect();
        body.push_str(&svg_chart(
            &format!("best val loss vs {key}"),
            &key,
            &series,
            true,
        ));
    }
    let (head, cells) = columns(rows);
    body.push_str("<table><tr>");
    for h in &head {
        let _ = write!(body, "<th>{}</th>", esc(h));
    }
    body.push_str("</tr>");
    for row in cells {
        body.push_str("<tr>");
        for c in row {
            let _ = write!(body, "<td>{}</td>", esc(&c));
        }
        body.push_str("</tr>");
    }
    body.push_str("</table>");
    Ok(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{}</title><style>body{{font-family:sans-serif;margin:24px}}svg{{display:block;margin:12px 0}}table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left}}</style></head><body>{body}</body></html>",
        esc(title)
    ))
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
            val_loss: loss,
            best_val_loss: loss,
            val_bpb: loss,
            tokens_per_s: Some(100.0),
            wall_s: 1.0,
            rung: None,
            sampler: None,
            param_count: Some(5),
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

    #[test]
    fn svg_is_self_contained() {
        let s = svg_chart(
            "t",
            "step",
            &[("a".into(), vec![(0.0, 1.0), (1.0, 0.5)])],
            false,
        );
        assert!(s.starts_with("<svg") && s.ends_with("</svg>") && s.contains("polyline"));
        // Nothing fetched from elsewhere: the only URL is the SVG namespace.
        assert_eq!(s.matches("http").count(), 1, "{s}");
    }

    #[test]
    fn ticks_are_round_and_inside_the_range() {
        let labels =
            |lo, hi| -> Vec<String> { nice_ticks(lo, hi).into_iter().map(|t| t.1).collect() };
        assert_eq!(labels(10.0, 200.0), ["50", "100", "150", "200"]);
        assert_eq!(labels(4.155, 7.443), ["5", "6", "7"]);
        assert_eq!(labels(3.61, 3.92), ["3.7", "3.8", "3.9"]);
        assert_eq!(labels(3.61, 3.75), ["3.65", "3.70", "3.75"]);
        assert_eq!(
            labels(0.0, 2_000_000.0),
            ["0", "0.5M", "1.0M", "1.5M", "2.0M"]
        );
        assert_eq!(labels(0.0, 40_960.0), ["0", "10k", "20k", "30k", "40k"]);
        assert_eq!(labels(-1.0, 1.0), ["-1.0", "-0.5", "0", "0.5", "1.0"]);
        assert!(nice_ticks(1.0, 1.0).is_empty());
        // A tick exactly on the low end is kept (1.1 / 0.1 is 11.000000000000002).
        assert_eq!(labels(1.1, 1.5)[0], "1.1");
        for (lo, hi) in [(0.013, 0.0171), (-3.0, 11.0), (123.0, 98765.0)] {
            let t = nice_ticks(lo, hi);
            assert!((2..=11).contains(&t.len()), "{lo} {hi}: {t:?}");
            assert!(
                t.iter().all(|(v, _)| *v >= lo - 1e-9 && *v <= hi + 1e-9),
                "{t:?}"
            );
        }
    }
}
