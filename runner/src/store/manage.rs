//! Run management: tags, a note per run, and removing runs (`runner tag`, `runner note`, `runner rm`), and
//! the reads the dashboard makes beyond the report rows (a change token, one metric after a step).

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use sqlx::Row;

use super::{now, RunStatus, RunStore};

/// What a tag may be: what a user types on a command line and filters by in the page.
pub fn check_tag(tag: &str) -> Result<()> {
    let ok = !tag.is_empty()
        && tag.len() <= 64
        && tag
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'));
    if !ok {
        bail!("tag {tag:?} is not valid: use 1–64 letters, digits or - _ . : / (e.g. baseline, paper-fig2)");
    }
    Ok(())
}

impl RunStore {
    /// Add tags to a run (`remove`: take them off). Unknown runs are refused.
    pub async fn tag(&self, run: i64, tags: &[String], remove: bool) -> Result<()> {
        self.run(run).await?;
        for t in tags {
            check_tag(t)?;
        }
        let mut tx = self.pool.begin().await?;
        for t in tags {
            let q = if remove {
                "DELETE FROM run_tags WHERE run_id = ? AND tag = ?"
            } else {
                "INSERT OR IGNORE INTO run_tags (run_id, tag) VALUES (?, ?)"
            };
            sqlx::query(q).bind(run).bind(t).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Set (or with an empty text, clear) a run's note.
    pub async fn set_note(&self, run: i64, note: &str) -> Result<()> {
        self.run(run).await?;
        if note.trim().is_empty() {
            sqlx::query("DELETE FROM run_notes WHERE run_id = ?")
                .bind(run)
                .execute(&self.pool)
                .await?;
        } else {
            sqlx::query(
                "INSERT INTO run_notes (run_id, note, time) VALUES (?, ?, ?) \
                 ON CONFLICT (run_id) DO UPDATE SET note = excluded.note, time = excluded.time",
            )
            .bind(run)
            .bind(note)
            .bind(now())
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    /// Tags and note of every run that has any: run → (tags, note).
    pub async fn annotations(&self) -> Result<BTreeMap<i64, (Vec<String>, Option<String>)>> {
        let mut out: BTreeMap<i64, (Vec<String>, Option<String>)> = BTreeMap::new();
        for r in sqlx::query("SELECT run_id, tag FROM run_tags ORDER BY run_id, tag")
            .fetch_all(&self.pool)
            .await?
        {
            out.entry(r.get(0)).or_default().0.push(r.get(1));
        }
        for r in sqlx::query("SELECT run_id, note FROM run_notes")
            .fetch_all(&self.pool)
            .await?
        {
            out.entry(r.get(0)).or_default().1 = Some(r.get(1));
        }
        Ok(out)
    }

    /// Why run `id` may not be removed now, if it may not: it is running, or a live runner holds it (a
    /// queued or paused run of a sweep in progress would be launched or promoted from under the delete).
    pub async fn rm_refusal(&self, id: i64) -> Result<Option<String>> {
        let run = self.run(id).await?;
        if run.status == RunStatus::Running {
            return Ok(Some(format!(
                "run {id} is running: stop its sweep first (Ctrl-C in its runner), then `runner rm {id}`"
            )));
        }
        if let Some(p) = run.other_live_runner() {
            return Ok(Some(format!(
                "run {id} belongs to runner pid {p}, which is still running: wait for it or stop it first"
            )));
        }
        // A queued run of a sweep a runner follows is in that runner's queue (or is a trial it made).
        if run.status == RunStatus::Queued {
            if let Some(p) = self.sweep_runners(run.sweep_id).await?.first() {
                return Ok(Some(format!(
                    "run {id} is queued in sweep s{} that runner pid {p} is running: stop that runner first (Ctrl-C), then `runner rm {id}`",
                    run.sweep_id
                )));
            }
        }
        Ok(None)
    }

    /// Remove run `id`'s rows (metrics, checkpoints, events, rung results, tags, note, the run) in one
    /// transaction. The caller removes its folder after, when this succeeded.
    pub async fn remove_run(&self, id: i64) -> Result<()> {
        if let Some(why) = self.rm_refusal(id).await? {
            bail!(why);
        }
        let mut tx = self.pool.begin().await?;
        for table in [
            "metrics",
            "checkpoints",
            "events",
            "rungs",
            "run_params",
            "run_tags",
            "run_notes",
        ] {
            sqlx::query(&format!("DELETE FROM {table} WHERE run_id = ?"))
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        // Not while it changed under us: a runner that claimed it since keeps it.
        let gone = sqlx::query("DELETE FROM runs WHERE id = ? AND status != 'running'")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if gone != 1 {
            bail!("run {id} started running meanwhile: nothing removed");
        }
        tx.commit().await?;
        Ok(())
    }

    /// Remove sweep `id` when no run of it is left.
    pub async fn remove_sweep_if_empty(&self, id: i64) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for q in [
            "DELETE FROM sweep_runners WHERE sweep_id = ? AND NOT EXISTS (SELECT 1 FROM runs WHERE sweep_id = ?)",
            "DELETE FROM sweeps WHERE id = ? AND NOT EXISTS (SELECT 1 FROM runs WHERE sweep_id = ?)",
        ] {
            sqlx::query(q).bind(id).bind(id).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A token that changes whenever anything the dashboard shows changes (a run's progress or status, a new
    /// event, run, tag or note): the page polls it and reloads only then.
    pub async fn change_token(&self) -> Result<String> {
        let r = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM runs), (SELECT TOTAL(step) + TOTAL(tokens) FROM runs), \
             (SELECT COALESCE(MAX(id), 0) FROM events), (SELECT COUNT(*) FROM run_tags), \
             (SELECT COUNT(*) || ':' || COALESCE(MAX(time), '') FROM run_notes), \
             (SELECT COUNT(*) FROM checkpoints)",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(format!(
            "{}-{}-{}-{}-{}-{}",
            r.get::<i64, _>(0),
            r.get::<f64, _>(1),
            r.get::<i64, _>(2),
            r.get::<i64, _>(3),
            r.get::<String, _>(4),
            r.get::<i64, _>(5)
        ))
    }

    /// How many runs of each sweep are in each status: sweep → status → count.
    pub async fn status_counts(&self) -> Result<BTreeMap<i64, BTreeMap<String, i64>>> {
        let mut out: BTreeMap<i64, BTreeMap<String, i64>> = BTreeMap::new();
        for r in
            sqlx::query("SELECT sweep_id, status, COUNT(*) FROM runs GROUP BY sweep_id, status")
                .fetch_all(&self.pool)
                .await?
        {
            out.entry(r.get(0)).or_default().insert(r.get(1), r.get(2));
        }
        Ok(out)
    }

    /// The names of the metrics `runs` recorded.
    pub async fn metric_names(&self, runs: &[i64]) -> Result<Vec<String>> {
        let mut names = std::collections::BTreeSet::new();
        for &run in runs {
            // One index seek per name: hop from name to the next through the primary key.
            let mut last = String::new();
            while let Some(n) = sqlx::query_scalar::<_, String>(
                "SELECT name FROM metrics WHERE run_id = ? AND name > ? ORDER BY name LIMIT 1",
            )
            .bind(run)
            .bind(&last)
            .fetch_optional(&self.pool)
            .await?
            {
                names.insert(n.clone());
                last = n;
            }
        }
        Ok(names.into_iter().collect())
    }

    /// (step, value) of one metric of `runs`, only the points after step `after` of each (the page's
    /// incremental update), one packed series per run.
    pub async fn history_after(
        &self,
        runs: &[i64],
        name: &str,
        after: i64,
    ) -> Result<BTreeMap<i64, Vec<(i64, f64)>>> {
        let mut out = BTreeMap::new();
        for chunk in runs.chunks(500) {
            let marks = vec!["?"; chunk.len()].join(",");
            let q = format!(
                "SELECT run_id, pack_points(step, value) FROM metrics \
                 WHERE run_id IN ({marks}) AND name = ? AND step > ? GROUP BY run_id"
            );
            let mut query = sqlx::query(&q);
            for id in chunk {
                query = query.bind(id);
            }
            for r in query.bind(name).bind(after).fetch_all(&self.pool).await? {
                out.insert(
                    r.get::<i64, _>(0),
                    crate::pack_points::unpack(r.get::<&[u8], _>(1)),
                );
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewRun;
    use engine::events::Event;

    #[test]
    fn tags_are_words() {
        for ok in ["baseline", "paper-fig2", "v1.2", "a/b:c_d"] {
            check_tag(ok).unwrap();
        }
        for bad in ["", "two words", "<b>", &"x".repeat(65)] {
            assert!(check_tag(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn removing_a_run_takes_every_row_of_it_and_only_its() {
        let dir = tempfile::tempdir().unwrap();
        let store = RunStore::open(dir.path()).await.unwrap();
        let sweep = store.create_sweep("s", "f", "{}").await.unwrap();
        let ids = store
            .add_runs(sweep, &[NewRun::test(""), NewRun::test("")], None)
            .await
            .unwrap();
        let step = Event::parse(r#"{"event":"step","step":1,"loss":2.5,"lr":0.001,"tokens":8,"tokens_per_s":100.0,"elapsed_s":0.1,"grad_norm":1.0}"#).unwrap();
        store
            .apply_events(&[(ids[0], step.clone()), (ids[1], step)])
            .await
            .unwrap();
        for &id in &ids {
            store.tag(id, &["t".into()], false).await.unwrap();
            store.set_note(id, "n").await.unwrap();
        }
        assert_eq!(store.metric_names(&ids[..1]).await.unwrap().len(), 5);
        let token = store.change_token().await.unwrap();
        store.remove_run(ids[0]).await.unwrap();
        assert_ne!(store.change_token().await.unwrap(), token);
        assert!(store.run(ids[0]).await.is_err());
        assert!(store.metric_names(&ids[..1]).await.unwrap().is_empty());
        assert!(store.events(ids[0]).await.unwrap().is_empty());
        let notes = store.annotations().await.unwrap();
        assert!(!notes.contains_key(&ids[0]) && notes.contains_key(&ids[1]));
        assert_eq!(store.metric(ids[1], "loss").await.unwrap().len(), 1);
        assert_eq!(store.integrity_check().await.unwrap(), "ok");
        // A running run is refused; an empty sweep goes with its last run.
        store
            .set_status(ids[1], RunStatus::Running, "test")
            .await
            .unwrap();
        assert!(store
            .remove_run(ids[1])
            .await
            .unwrap_err()
            .to_string()
            .contains("is running"));
        store
            .set_status(ids[1], RunStatus::Completed, "test")
            .await
            .unwrap();
        store.remove_run(ids[1]).await.unwrap();
        store.remove_sweep_if_empty(sweep).await.unwrap();
        assert!(store.sweeps().await.unwrap().is_empty());
        // Unknown runs and bad tags are refused by name.
        assert!(store
            .tag(99, &["t".into()], false)
            .await
            .unwrap_err()
            .to_string()
            .contains("no run with id 99"));
    }
}
