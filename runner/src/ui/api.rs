//! The dashboard's data: the JSON the server answers and the offline report inlines, built by the same
//! functions so the two cannot drift apart.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use serde_json::{json, Value};

use crate::report::{self, ReportRow};
use crate::store::{RunRow, RunStore};

/// Every run as `runner report --format json` shows it (with tags and note), in id order.
pub async fn runs(store: &RunStore) -> Result<Vec<ReportRow>> {
    let runs = store.runs(None).await?;
    report::rows(store, &runs).await
}

/// Sweeps with their run counts by status and the early-stopping rule they use.
pub async fn sweeps(store: &RunStore) -> Result<Value> {
    let mut counts = store.status_counts().await?;
    let mut out = Vec::new();
    for s in store.sweeps().await? {
        let spec: Option<crate::spec::SweepFile> =
            serde_json::from_str(&store.sweep_spec(s.id).await?).ok();
        let early = spec
            .as_ref()
            .map(|f| &f.early_stop)
            .filter(|e| e.enabled())
            .map(|e| e.describe());
        out.push(json!({
            "id": format!("s{}", s.id), "name": s.name, "file": s.file, "created_at": s.created_at,
            "counts": counts.remove(&s.id).unwrap_or_default(), "early_stop": early,
        }));
    }
    Ok(Value::Array(out))
}

/// A shell word: the path as typed, or single-quoted when it holds anything a shell would read.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// One run's page: its report row, config, event log, the checkpoints that still exist, the metrics it
/// recorded, and the commands to chat with it and to manage it.
pub async fn run_detail(store: &RunStore, id: i64) -> Result<Value> {
    let run = store.run(id).await?;
    let row = report::rows(store, std::slice::from_ref(&run))
        .await?
        .remove(0);
    let checkpoints: Vec<Value> = store
        .checkpoints(id)
        .await?
        .into_iter()
        .map(|c| {
            let exists = Path::new(&c.path).is_dir();
            json!({"step": c.step, "path": c.path, "bytes": c.bytes, "sha256": c.sha256, "exists": exists})
        })
        .collect();
    let usable = checkpoints.iter().any(|c| c["exists"] == true);
    let generate = usable.then(|| {
        format!(
            "engine generate --checkpoint {} --prompt \"Once upon a time\" --max-tokens 100",
            shell_word(&run.run_dir)
        )
    });
    let home = shell_word(&store.home.display().to_string());
    Ok(json!({
        "run": row,
        "run_dir": run.run_dir,
        "device": run.device,
        "slurm_job": run.slurm_job,
        "restarts": run.restarts,
        "config": run.config,
        "events": store.events(id).await?,
        "checkpoints": checkpoints,
        "metrics": store.metric_names(&[id]).await?,
        "generate": generate,
        "manage": {
            "tag": format!("runner --home {home} tag {id} TAG"),
            "note": format!("runner --home {home} note {id} \"TEXT\""),
            "rm": format!("runner --home {home} rm {id}"),
        },
    }))
}

/// Points of metric `name` of each `(run, after)`: those after step `after`, as columns — step, tokens
/// seen, elapsed seconds, value — so the page can draw any of the three x axes.
pub async fn metrics(store: &RunStore, wanted: &[(i64, i64)], name: &str) -> Result<Value> {
    let mut out = serde_json::Map::new();
    // Runs asking from the same step are read together (the page's first load asks from 0 for all).
    let mut by_after: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for &(run, after) in wanted {
        by_after.entry(after).or_default().push(run);
    }
    let rows: BTreeMap<i64, RunRow> = {
        let mut m = BTreeMap::new();
        for &(run, _) in wanted {
            if let std::collections::btree_map::Entry::Vacant(e) = m.entry(run) {
                e.insert(store.run(run).await?);
            }
        }
        m
    };
    for (after, runs) in by_after {
        let values = store.history_after(&runs, name, after).await?;
        let elapsed = if name == "elapsed_s" {
            values.clone()
        } else {
            // From one step before: an eval at the window's first step still finds its neighbour.
            store
                .history_after(&runs, "elapsed_s", after.saturating_sub(1))
                .await?
        };
        for run in runs {
            let r = &rows[&run];
            let pts = values.get(&run).map(Vec::as_slice).unwrap_or_default();
            let clock = elapsed.get(&run).map(Vec::as_slice).unwrap_or_default();
            let tokens_per_step = (r.step > 0).then(|| r.tokens as f64 / r.step as f64);
            let steps: Vec<i64> = pts.iter().map(|p| p.0).collect();
            let tokens: Vec<Option<f64>> = steps
                .iter()
                .map(|&s| tokens_per_step.map(|k| (s as f64 * k).round()))
                .collect();
            let secs: Vec<Option<f64>> = steps
                .iter()
                .map(|&s| elapsed_at(clock, s).or_else(|| linear_clock(r, s)))
                .collect();
            let vals: Vec<Option<f64>> =
                pts.iter().map(|p| p.1.is_finite().then_some(p.1)).collect();
            out.insert(
                run.to_string(),
                json!({"step": steps, "tokens": tokens, "elapsed_s": secs, "value": vals}),
            );
        }
    }
    Ok(Value::Object(out))
}

/// Seconds into the run at step `s`, from its `elapsed_s` series (linear between logged steps, the last
/// one past the end).
fn elapsed_at(clock: &[(i64, f64)], s: i64) -> Option<f64> {
    let i = clock.partition_point(|p| p.0 < s);
    match (i.checked_sub(1).map(|j| clock[j]), clock.get(i)) {
        (_, Some(&(t, v))) if t == s => Some(v),
        (Some((s0, v0)), Some(&(s1, v1))) => {
            Some(v0 + (v1 - v0) * (s - s0) as f64 / (s1 - s0) as f64)
        }
        (Some((_, v0)), None) => Some(v0),
        (None, Some(&(_, v1))) => Some(v1),
        (None, None) => None,
    }
}

/// Runs recorded before per-step seconds were kept: their wall time spread evenly over their steps.
fn linear_clock(r: &RunRow, s: i64) -> Option<f64> {
    (r.step > 0 && r.wall_s > 0.0).then(|| r.wall_s * s as f64 / r.step as f64)
}

/// The fits and points of `sweep`'s scaling study (its completed runs), grouped by `group_by`; bootstrap
/// intervals from 200 resamples.
pub async fn scaling(store: &RunStore, sweep: i64, group_by: Option<&str>) -> Result<Value> {
    let (groups, left_out) = crate::scaling::collect(store, &[sweep], group_by).await?;
    let mut v = serde_json::to_value(crate::scaling::fit_groups(&groups, 200, None))?;
    v["runs_left_out"] = json!(left_out);
    Ok(v)
}

/// Everything the page shows, for the offline report: the same answers the server gives, inlined.
pub async fn snapshot(store: &RunStore, rows: Vec<ReportRow>, title: &str) -> Result<Value> {
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let mut details = serde_json::Map::new();
    for &id in &ids {
        details.insert(id.to_string(), run_detail(store, id).await?);
    }
    let names = store.metric_names(&ids).await?;
    let wanted: Vec<(i64, i64)> = ids.iter().map(|&i| (i, 0)).collect();
    let mut metrics = serde_json::Map::new();
    for name in &names {
        metrics.insert(name.clone(), self::metrics(store, &wanted, name).await?);
    }
    let sweeps = sweeps(store).await?;
    let listed: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r.sweep_id.as_str()).collect();
    let sweeps: Vec<Value> = sweeps
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| listed.contains(s["id"].as_str().unwrap_or_default()))
        .cloned()
        .collect();
    // The scaling view of each IsoFLOP study in the report, by each swept key or none.
    let mut scaling = serde_json::Map::new();
    for s in listed
        .iter()
        .filter_map(|s| s.strip_prefix('s')?.parse::<i64>().ok())
    {
        let studied = rows
            .iter()
            .filter(|r| r.sweep_id == format!("s{s}"))
            .any(|r| r.budget.is_some());
        if !studied {
            continue;
        }
        let mut keys: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        for r in rows.iter().filter(|r| r.sweep_id == format!("s{s}")) {
            if let Some(p) = r.params.as_object() {
                keys.extend(p.keys().filter(|k| k.as_str() != "max_tokens").cloned());
            }
        }
        let mut by = serde_json::Map::new();
        by.insert(String::new(), self::scaling(store, s, None).await?);
        for k in keys {
            if let Ok(v) = self::scaling(store, s, Some(&k)).await {
                by.insert(k, v);
            }
        }
        scaling.insert(format!("s{s}"), Value::Object(by));
    }
    Ok(json!({
        "title": title,
        "generated": crate::store::now(),
        "runs": rows,
        "sweeps": sweeps,
        "details": details,
        "metric_names": names,
        "metrics": metrics,
        "scaling": scaling,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elapsed_is_read_off_the_clock_and_interpolated() {
        let clock = [(10, 1.0), (20, 3.0)];
        assert_eq!(elapsed_at(&clock, 10), Some(1.0));
        assert_eq!(elapsed_at(&clock, 15), Some(2.0));
        assert_eq!(elapsed_at(&clock, 25), Some(3.0));
        assert_eq!(elapsed_at(&clock, 5), Some(1.0));
        assert_eq!(elapsed_at(&[], 5), None);
    }

    #[test]
    fn shell_words_are_quoted_when_needed() {
        assert_eq!(shell_word("/runs/run-3"), "/runs/run-3");
        assert_eq!(shell_word("/my runs/it's"), "'/my runs/it'\\''s'");
    }
}
