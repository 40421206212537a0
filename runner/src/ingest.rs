//! Ingestion: engine protocol events in, SQLite rows out. One writer task owns all writes and commits
//! batches of whatever has queued up, each in one transaction ([`RunStore::apply_events`] holds the SQL),
//! retried when the database is briefly busy or the disk briefly full.

use anyhow::Result;
use engine::events::Event;
use tokio::sync::{mpsc, oneshot};

use crate::store::RunStore;

/// What the writer task is told.
pub enum Msg {
    /// A protocol event of run `run`.
    Event(i64, Event),
    /// Reply once everything sent before has been committed.
    Flush(oneshot::Sender<()>),
}

/// Whether a failed commit may succeed when tried again: the database busy or locked beyond the busy
/// timeout, a full disk, an I/O error. A malformed statement or a constraint would fail the same way again.
fn transient(e: &anyhow::Error) -> bool {
    match e.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(db)) => {
            // SQLite primary result codes: BUSY 5, LOCKED 6, IOERR 10, FULL 13.
            let primary = db
                .code()
                .and_then(|c| c.parse::<i64>().ok())
                .map(|c| c & 0xff);
            matches!(primary, Some(5 | 6 | 10 | 13))
        }
        Some(sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut) => true,
        _ => false,
    }
}

/// [`RunStore::apply_events`], retried for about a minute when it fails (a long-held lock beyond the busy timeout, a disk
/// briefly full): a failed commit rolls back whole, so retrying cannot double anything.
async fn apply_with_retries(store: &RunStore, batch: &[(i64, Event)]) -> Result<()> {
    const TRIES: u32 = 12;
    for attempt in 1.. {
        match store.apply_events(batch).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < TRIES && transient(&e) => {
                tracing::warn!("writing {} events to runs.db failed (try {attempt} of {TRIES}; retrying): {e:#}", batch.len());
                tokio::time::sleep(std::time::Duration::from_secs(u64::from(attempt).min(10)))
                    .await;
            }
            Err(e) => {
                return Err(e.context(
                    "writing to runs.db kept failing (every run's metrics.jsonl in its run dir still holds all its events)",
                ));
            }
        }
    }
    unreachable!("the loop returns")
}

/// Most events one transaction takes.
const MAX_BATCH: usize = 100_000;

/// How long the writer gathers events before committing them.
const COALESCE: std::time::Duration = std::time::Duration::from_millis(25);

/// Start the single writer task. Events are committed in batches of whatever has queued up.
pub fn spawn_writer(
    store: RunStore,
) -> (
    mpsc::UnboundedSender<Msg>,
    tokio::task::JoinHandle<Result<()>>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
    let handle = tokio::spawn(async move {
        let mut batch = Vec::new();
        let mut waiters = Vec::new();
        while let Some(first) = rx.recv().await {
            // Gather for up to COALESCE (or MAX_BATCH events, or until someone waits on a flush): a commit
            // costs the same for 10 events as for 10,000.
            let deadline = tokio::time::Instant::now() + COALESCE;
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Event(run, ev) => batch.push((run, ev)),
                    Msg::Flush(w) => waiters.push(w),
                }
                if batch.len() >= MAX_BATCH {
                    break;
                }
                next = match rx.try_recv() {
                    Ok(m) => Some(m),
                    Err(mpsc::error::TryRecvError::Empty) if waiters.is_empty() => {
                        tokio::time::timeout_at(deadline, rx.recv())
                            .await
                            .ok()
                            .flatten()
                    }
                    Err(_) => None,
                };
            }
            if !batch.is_empty() {
                apply_with_retries(&store, &batch).await?;
                batch.clear();
            }
            for w in waiters.drain(..) {
                let _ = w.send(());
            }
        }
        Ok(())
    });
    (tx, handle)
}

/// Send the step, eval and checkpoint events of an existing `metrics.jsonl` of run `run` (none when the
/// file is missing), of its final timeline only: a `start` at step s in the file discards the events after
/// s that came before it. Their rows are upserts, so events ingested before are not doubled; done and
/// interruption notes are not repeated, and of the file's `start` events only those past the first
/// `starts_recorded` (the store's count) are sent: a runner killed before it ingested a start leaves no
/// hole in the event log, and one that did is not repeated. Returns the `done` or `paused` event that
/// ended that timeline (a run that paused while no runner followed it must still be judged by the
/// early-stopping rule).
pub fn backfill(
    tx: &mpsc::UnboundedSender<Msg>,
    run: i64,
    metrics: &std::path::Path,
    starts_recorded: usize,
) -> Option<Event> {
    let text = std::fs::read_to_string(metrics).ok()?;
    let mut timeline: Vec<(u64, Event)> = Vec::new();
    let mut ended = None;
    let mut starts = 0;
    for ev in text.lines().filter_map(Event::parse) {
        let step = match &ev {
            Event::Start { step, .. } => {
                // Every start is kept (its note belongs to the log), with what its timeline kept.
                timeline.retain(|(s, e)| s <= step || matches!(e, Event::Start { .. }));
                ended = None;
                starts += 1;
                if starts > starts_recorded {
                    // In file order: it truncates what came after its step, as when it was first read.
                    timeline.push((*step, ev));
                }
                continue;
            }
            Event::Done { .. } | Event::Paused { .. } => {
                ended = Some(ev);
                continue;
            }
            Event::Step { step, .. } | Event::Eval { step, .. } => *step,
            // A checkpoint rotated away since keeps the row (and sha256) it was recorded with.
            Event::Checkpoint { path, step, .. } if std::path::Path::new(path).is_dir() => *step,
            _ => continue,
        };
        timeline.push((step, ev));
    }
    for (_, ev) in timeline {
        let _ = tx.send(Msg::Event(run, ev));
    }
    ended
}

/// Wait until everything sent so far is committed.
pub async fn flush(tx: &mpsc::UnboundedSender<Msg>) {
    let (done, wait) = oneshot::channel();
    if tx.send(Msg::Flush(done)).is_ok() {
        let _ = wait.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backfill_resends_steps_evals_and_present_checkpoints_only() {
        let dir = tempfile::tempdir().unwrap();
        let kept = dir.path().join("step-00000002");
        std::fs::create_dir(&kept).unwrap();
        let gone = dir.path().join("step-00000001");
        let metrics = dir.path().join("metrics.jsonl");
        let lines = [
            r#"{"event":"start","version":1,"resumed":false,"step":0,"params":10}"#.to_string(),
            r#"{"event":"step","step":1,"loss":2.5,"lr":0.001,"tokens":8,"tokens_per_s":100.0,"elapsed_s":0.1,"grad_norm":1.0}"#.into(),
            format!(r#"{{"event":"checkpoint","step":1,"path":"{}","bytes":10}}"#, gone.display()),
            r#"{"event":"eval","step":2,"val_loss":2.0,"val_bpb":1.0}"#.into(),
            format!(r#"{{"event":"checkpoint","step":2,"path":"{}","bytes":10}}"#, kept.display()),
            "not json".into(),
        ];
        std::fs::write(&metrics, lines.join("\n")).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        backfill(&tx, 7, &metrics, 9);
        backfill(&tx, 7, &dir.path().join("missing.jsonl"), 0);
        drop(tx);
        let mut got = Vec::new();
        while let Ok(Msg::Event(run, ev)) = rx.try_recv() {
            assert_eq!(run, 7);
            got.push(ev);
        }
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(matches!(got[0], Event::Step { step: 1, .. }));
        assert!(matches!(got[1], Event::Eval { step: 2, .. }));
        assert!(matches!(got[2], Event::Checkpoint { step: 2, .. }));

        // A resumed start discards what the file logged after its step before it.
        let resumed = [
            lines[0].clone(),
            lines[1].clone(),
            lines[3].clone(),
            r#"{"event":"start","protocol":1,"run_dir":"r","step":1,"total_steps":null,"params":10,"resumed":true,"device":"cpu","world_size":1}"#.into(),
            r#"{"event":"step","step":2,"loss":9.0,"lr":0.001,"tokens":16,"tokens_per_s":100.0,"elapsed_s":0.2,"grad_norm":1.0}"#.into(),
        ];
        std::fs::write(&metrics, resumed.join("\n")).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        backfill(&tx, 7, &metrics, 9);
        drop(tx);
        let mut got = Vec::new();
        while let Ok(Msg::Event(_, ev)) = rx.try_recv() {
            got.push(ev);
        }
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(matches!(got[0], Event::Step { step: 1, .. }));
        assert!(matches!(got[1], Event::Step { step: 2, loss, .. } if loss == 9.0));
        // A done event on the final timeline is reported; one before a later start is not.
        let done = r#"{"event":"done","step":2,"tokens":16,"elapsed_s":0.3,"val_loss":null,"val_bpb":null}"#;
        let (tx, _rx) = mpsc::unbounded_channel();
        std::fs::write(&metrics, [resumed.join("\n"), done.to_string()].join("\n")).unwrap();
        assert!(matches!(
            backfill(&tx, 7, &metrics, 9),
            Some(Event::Done { .. })
        ));
        std::fs::write(&metrics, [done.to_string(), resumed[3].clone()].join("\n")).unwrap();
        assert!(backfill(&tx, 7, &metrics, 9).is_none());

        // Starts the store has not recorded (its runner was killed first) are sent in file order, the
        // ones it has are not repeated.
        let fresh = r#"{"event":"start","protocol":1,"run_dir":"r","step":0,"total_steps":null,"params":10,"resumed":false,"device":"cpu","world_size":1}"#;
        let both = [&[fresh.to_string()], &resumed[1..]].concat();
        std::fs::write(&metrics, both.join("\n")).unwrap();
        for (recorded, want) in [(0, vec![0, 1]), (1, vec![1]), (2, vec![])] {
            let (tx, mut rx) = mpsc::unbounded_channel();
            backfill(&tx, 7, &metrics, recorded);
            drop(tx);
            let mut starts = Vec::new();
            let mut kinds = Vec::new();
            while let Ok(Msg::Event(_, ev)) = rx.try_recv() {
                if let Event::Start { step, .. } = &ev {
                    starts.push(*step);
                }
                kinds.push(format!("{ev:?}"));
            }
            assert_eq!(starts, want, "{recorded} recorded: {kinds:?}");
            assert_eq!(kinds.len(), 2 + want.len(), "{kinds:?}");
        }
    }

    fn start(step: u64, resumed: bool) -> Event {
        Event::parse(&format!(
            r#"{{"event":"start","protocol":1,"run_dir":"r","step":{step},"total_steps":null,"params":10,"resumed":{resumed},"device":"cpu","world_size":1}}"#
        ))
        .unwrap()
    }

    fn step(step: u64, loss: f64) -> Event {
        Event::parse(&format!(
            r#"{{"event":"step","step":{step},"loss":{loss},"lr":0.001,"tokens":8,"tokens_per_s":100.0,"elapsed_s":0.1,"grad_norm":1.0}}"#
        ))
        .unwrap()
    }

    fn eval(step: u64, val: f64) -> Event {
        Event::parse(&format!(
            r#"{{"event":"eval","step":{step},"val_loss":{val},"val_bpb":{val}}}"#
        ))
        .unwrap()
    }

    fn checkpoint(step: u64) -> Event {
        Event::parse(&format!(
            r#"{{"event":"checkpoint","step":{step},"path":"/nowhere/step-{step}","bytes":1}}"#
        ))
        .unwrap()
    }

    #[tokio::test]
    async fn a_malformed_statement_is_not_retried() -> Result<()> {
        let d = tempfile::tempdir()?;
        let store = RunStore::open(d.path()).await?;
        let err = sqlx::query("SELEC 1")
            .execute(store.pool_for_tests())
            .await
            .unwrap_err();
        assert!(!transient(&anyhow::Error::from(err)));
        assert!(transient(&anyhow::Error::from(sqlx::Error::PoolTimedOut)));
        Ok(())
    }

    /// Timeline A logs steps 1–14 (evals at 6 and 12, checkpoints at 5 and 10); it is killed and resumed
    /// from step 10 as timeline B, which logs 11–12 with other values. Whether the resume lands in a later
    /// batch or in the same one, nothing of A after step 10 survives.
    #[tokio::test]
    async fn a_resumed_start_drops_the_abandoned_timeline() -> Result<()> {
        let timeline_a: Vec<Event> = std::iter::once(start(0, false))
            .chain((1..=14).map(|s| step(s, 5.0)))
            .chain([eval(6, 4.0), checkpoint(5), checkpoint(10), eval(12, 1.0)])
            .collect();
        let timeline_b: Vec<Event> =
            vec![start(10, true), step(11, 7.0), step(12, 7.5), eval(12, 3.0)];
        for split in [true, false] {
            let d = tempfile::tempdir()?;
            let store = RunStore::open(d.path()).await?;
            let s = store.create_sweep("t", "f.toml", "{}").await?;
            let run = store
                .add_runs(s, &[crate::store::NewRun::test("dim = 8")], None)
                .await?[0];
            let a: Vec<(i64, Event)> = timeline_a.iter().map(|e| (run, e.clone())).collect();
            let b: Vec<(i64, Event)> = timeline_b.iter().map(|e| (run, e.clone())).collect();
            if split {
                store.apply_events(&a).await?;
                store.apply_events(&b).await?;
            } else {
                store.apply_events(&[a, b].concat()).await?;
            }
            let loss = store.metric(run, "loss").await?;
            assert_eq!(loss.len(), 12, "split {split}: {loss:?}");
            assert_eq!(&loss[10..], &[(11, 7.0), (12, 7.5)], "split {split}");
            assert_eq!(
                store.metric(run, "val_loss").await?,
                vec![(6, 4.0), (12, 3.0)]
            );
            let r = store.run(run).await?;
            assert_eq!(
                (r.step, r.val_loss, r.best_val_loss),
                (12, Some(3.0), Some(3.0)),
                "split {split}: the abandoned eval's 1.0 must not stay best"
            );
            assert_eq!(
                r.checkpoint.as_deref(),
                Some("/nowhere/step-10"),
                "split {split}"
            );
        }
        Ok(())
    }
}
