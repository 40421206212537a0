//! The SQL of ingestion: a batch of engine protocol events in, rows out, in one transaction (metrics as
//! multi-row upserts, one progress update per run). The writer task ([`crate::ingest`]) decides what goes
//! into a batch; the statements live here with the rest of the store's SQL.
//!
//! A run has one timeline. An engine that resumes from the checkpoint at step s (after a kill, the steps
//! after s it had logged are abandoned) says so in its `start` event; ingesting that event drops the run's
//! metrics and checkpoint rows after s, in the database and in the batch, and recomputes the run's
//! val_loss / best_val_loss / checkpoint columns, so no value from an abandoned timeline survives.
//! Checkpoint rows of folders rotated away (`keep_checkpoints`) are dropped when a newer one arrives.

use std::collections::HashMap;

use anyhow::Result;
use engine::events::Event;
use sqlx::Row;

use super::{now, RunStore};

/// Latest progress of a run within one batch.
#[derive(Default)]
struct Progress {
    step: Option<i64>,
    total_steps: Option<i64>,
    tokens: Option<i64>,
    loss: Option<f64>,
    tokens_per_s: Option<f64>,
    wall_s: Option<f64>,
    val_loss: Option<f64>,
    best_val_loss: Option<f64>,
    val_bpb: Option<f64>,
    checkpoint: Option<String>,
}

/// Rows per multi-row INSERT (5 bound values each, under SQLite's 32,766-variable limit).
const ROWS_PER_STATEMENT: usize = 1000;

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Sha256 of the model file, as recorded in the checkpoint's own state.json.
fn checkpoint_sha(path: &str) -> Option<String> {
    let text = std::fs::read_to_string(std::path::Path::new(path).join("state.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["model_sha256"].as_str().map(str::to_string)
}

impl RunStore {
    /// Commit a batch of protocol events in one transaction (the writer task's one statement batch).
    pub async fn apply_events(&self, batch: &[(i64, Event)]) -> Result<()> {
        let store = self;
        let t = unix_now();
        let mut points: Vec<(i64, &str, i64, f64)> = Vec::new();
        let mut progress: HashMap<i64, Progress> = HashMap::new();
        let mut checkpoints: Vec<(i64, i64, String, i64, Option<String>)> = Vec::new();
        let mut notes = Vec::new();
        // Run → the earliest step a `start` in this batch continues from: later rows are dropped.
        let mut truncate: HashMap<i64, i64> = HashMap::new();
        for (run, ev) in batch {
            let p = progress.entry(*run).or_default();
            match ev {
                Event::Start {
                    step,
                    total_steps,
                    resumed,
                    ..
                } => {
                    let s = *step as i64;
                    // What this batch gathered after step s belongs to the abandoned timeline.
                    points.retain(|q| q.0 != *run || q.2 <= s);
                    checkpoints.retain(|c| c.0 != *run || c.1 <= s);
                    truncate
                        .entry(*run)
                        .and_modify(|m| *m = (*m).min(s))
                        .or_insert(s);
                    *p = Progress {
                        step: Some(s),
                        total_steps: total_steps.map(|t| t as i64),
                        ..Progress::default()
                    };
                    let what = if *resumed { "resumed" } else { "started" };
                    notes.push((*run, "engine", format!("engine {what} at step {step}")));
                }
                Event::Step {
                    step,
                    loss,
                    lr,
                    tokens,
                    tokens_per_s,
                    elapsed_s,
                    grad_norm,
                    extra,
                } => {
                    let s = *step as i64;
                    points.extend([
                        (*run, "loss", s, *loss),
                        (*run, "lr", s, *lr),
                        (*run, "tokens_per_s", s, *tokens_per_s),
                        (*run, "grad_norm", s, *grad_norm),
                        // Curves by wall time (the dashboard's x axis) read it per step.
                        (*run, "elapsed_s", s, *elapsed_s),
                    ]);
                    points.extend(extra.iter().map(|(k, v)| (*run, k.as_str(), s, *v)));
                    p.step = Some(s);
                    p.loss = Some(*loss);
                    p.tokens = Some(*tokens as i64);
                    p.tokens_per_s = Some(*tokens_per_s);
                    p.wall_s = Some(*elapsed_s);
                }
                Event::Eval {
                    step,
                    val_loss,
                    val_bpb,
                } => {
                    let s = *step as i64;
                    points.extend([
                        (*run, "val_loss", s, *val_loss),
                        (*run, "val_bpb", s, *val_bpb),
                    ]);
                    p.val_loss = Some(*val_loss);
                    p.val_bpb = Some(*val_bpb);
                    p.best_val_loss = Some(p.best_val_loss.map_or(*val_loss, |b| b.min(*val_loss)));
                }
                Event::Checkpoint { step, path, bytes } => {
                    checkpoints.push((
                        *run,
                        *step as i64,
                        path.clone(),
                        *bytes as i64,
                        checkpoint_sha(path),
                    ));
                    p.checkpoint = Some(path.clone());
                }
                Event::Done {
                    step,
                    tokens,
                    elapsed_s,
                    ..
                } => {
                    p.step = Some(*step as i64);
                    p.tokens = Some(*tokens as i64);
                    p.wall_s = Some(*elapsed_s);
                }
                Event::Interrupted { step, signal } => {
                    notes.push((
                        *run,
                        "engine",
                        match signal.as_str() {
                            "parent" => format!(
                                "engine stopped at step {step}: the process that launched it died"
                            ),
                            "peer" => format!(
                            "engine stopped at step {step}: another rank of the run was signalled"
                        ),
                            s => format!("engine interrupted by {s} at step {step}"),
                        },
                    ));
                }
                Event::Paused {
                    step,
                    tokens,
                    elapsed_s,
                    val_loss,
                    ..
                } => {
                    p.step = Some(*step as i64);
                    p.tokens = Some(*tokens as i64);
                    p.wall_s = Some(*elapsed_s);
                    notes.push((
                        *run,
                        "engine",
                        format!("paused at step {step} ({tokens} tokens): val loss {val_loss:.4}"),
                    ));
                }
                Event::Error { message } => notes.push((*run, "error", message.clone())),
            }
        }

        // `metrics.value` is NOT NULL and SQLite stores NaN as NULL: a non-finite point is not a point.
        points.retain(|p| p.3.is_finite());
        // Insert in primary-key order: the B-tree is then walked left to right instead of hopping between runs.
        points.sort_unstable_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
        let mut tx = store.pool.begin().await?;
        for (run, step) in &truncate {
            for table in ["metrics", "checkpoints"] {
                sqlx::query(&format!(
                    "DELETE FROM {table} WHERE run_id = ? AND step > ?"
                ))
                .bind(run)
                .bind(step)
                .execute(&mut *tx)
                .await?;
            }
        }
        for chunk in points.chunks(ROWS_PER_STATEMENT) {
            // Plain `?` only: sqlx looks up the name of every numbered parameter, which SQLite answers by a
            // linear scan (quadratic in the row count).
            let mut q = String::with_capacity(80 + chunk.len() * 12);
            q.push_str("INSERT OR REPLACE INTO metrics (run_id, name, step, value, time) VALUES ");
            for i in 0..chunk.len() {
                q.push_str(if i == 0 {
                    "(?,?,?,?,?)"
                } else {
                    ",(?,?,?,?,?)"
                });
            }
            let mut query = sqlx::query(&q);
            for (run, name, step, value) in chunk {
                query = query
                    .bind(*run)
                    .bind(*name)
                    .bind(*step)
                    .bind(*value)
                    .bind(t);
            }
            query.execute(&mut *tx).await?;
        }
        let with_checkpoint: std::collections::BTreeSet<i64> =
            checkpoints.iter().map(|c| c.0).collect();
        for (run, step, path, bytes, sha) in checkpoints {
            sqlx::query("INSERT OR REPLACE INTO checkpoints (run_id, step, path, bytes, sha256, time) VALUES (?, ?, ?, ?, ?, ?)")
            .bind(run)
            .bind(step)
            .bind(path)
            .bind(bytes)
            .bind(sha)
            .bind(now())
            .execute(&mut *tx)
            .await?;
        }
        // A checkpoint folder rotated away by `keep_checkpoints` (its checkpoints/ folder is still there, the
        // step folder is not) is no longer offered: its row goes when a newer checkpoint of the run arrives.
        for run in with_checkpoint {
            let rows = sqlx::query("SELECT step, path FROM checkpoints WHERE run_id = ?")
                .bind(run)
                .fetch_all(&mut *tx)
                .await?;
            for r in rows {
                let path = std::path::PathBuf::from(r.get::<String, _>(1));
                let rotated = !path.exists() && path.parent().is_some_and(|p| p.is_dir());
                if rotated {
                    sqlx::query("DELETE FROM checkpoints WHERE run_id = ? AND step = ?")
                        .bind(run)
                        .bind(r.get::<i64, _>(0))
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        for (run, kind, reason) in notes {
            sqlx::query("INSERT INTO events (run_id, time, kind, reason) VALUES (?, ?, ?, ?)")
                .bind(run)
                .bind(now())
                .bind(kind)
                .bind(reason)
                .execute(&mut *tx)
                .await?;
        }
        for run in truncate.keys() {
            // What the remaining timeline says (the progress update below then folds in this batch).
            sqlx::query(
            "UPDATE runs SET \
             best_val_loss = (SELECT MIN(value) FROM metrics WHERE run_id = ? AND name = 'val_loss'), \
             val_loss = (SELECT value FROM metrics WHERE run_id = ? AND name = 'val_loss' ORDER BY step DESC LIMIT 1), \
             val_bpb = (SELECT value FROM metrics WHERE run_id = ? AND name = 'val_bpb' ORDER BY step DESC LIMIT 1), \
             checkpoint = (SELECT path FROM checkpoints WHERE run_id = ? ORDER BY step DESC LIMIT 1), \
             loss = (SELECT value FROM metrics WHERE run_id = ? AND name = 'loss' ORDER BY step DESC LIMIT 1), \
             tokens_per_s = (SELECT value FROM metrics WHERE run_id = ? AND name = 'tokens_per_s' ORDER BY step DESC LIMIT 1) \
             WHERE id = ?",
        )
        .bind(run)
        .bind(run)
        .bind(run)
        .bind(run)
        .bind(run)
        .bind(run)
        .bind(run)
        .execute(&mut *tx)
        .await?;
        }
        for (run, p) in progress {
            sqlx::query(
            "UPDATE runs SET step = COALESCE(?, step), total_steps = COALESCE(?, total_steps), tokens = COALESCE(?, tokens), \
             loss = COALESCE(?, loss), tokens_per_s = COALESCE(?, tokens_per_s), wall_s = COALESCE(?, wall_s), \
             val_loss = COALESCE(?, val_loss), val_bpb = COALESCE(?, val_bpb), \
             best_val_loss = CASE WHEN ? IS NULL THEN best_val_loss WHEN best_val_loss IS NULL OR ? < best_val_loss THEN ? ELSE best_val_loss END, \
             checkpoint = COALESCE(?, checkpoint) WHERE id = ?",
        )
        .bind(p.step)
        .bind(p.total_steps)
        .bind(p.tokens)
        .bind(p.loss)
        .bind(p.tokens_per_s)
        .bind(p.wall_s)
        .bind(p.val_loss)
        .bind(p.val_bpb)
        .bind(p.best_val_loss)
        .bind(p.best_val_loss)
        .bind(p.best_val_loss)
        .bind(p.checkpoint)
        .bind(run)
        .execute(&mut *tx)
        .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
