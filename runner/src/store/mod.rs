//! `RunStore`: the SQLite database of sweeps, runs, metrics, checkpoints and status events (sqlx).
//! WAL mode and a busy timeout let several runners share one home; each statement batch is a transaction,
//! so a crash never leaves the DB half-written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, Row, SqlitePool};

mod apply;
mod manage;

use crate::search::early_stop::RungResult;
pub use manage::check_tag;

/// Run statuses, exactly as stored in `runs.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "TEXT", rename_all = "snake_case")]
pub enum RunStatus {
    Queued,
    Running,
    Completed,
    Failed,
    Interrupted,
    SkippedOom,
    /// Waiting at an early-stopping rung (checkpoint kept) for the rule to promote it.
    Paused,
    /// Paused at a rung the search ended without promoting; `runner resume ID` trains it to full length.
    Pruned,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Interrupted => "interrupted",
            RunStatus::SkippedOom => "skipped_oom",
            RunStatus::Paused => "paused",
            RunStatus::Pruned => "pruned",
        }
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for RunStatus {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "queued" => RunStatus::Queued,
            "running" => RunStatus::Running,
            "completed" => RunStatus::Completed,
            "failed" => RunStatus::Failed,
            "interrupted" => RunStatus::Interrupted,
            "skipped_oom" => RunStatus::SkippedOom,
            "paused" => RunStatus::Paused,
            "pruned" => RunStatus::Pruned,
            other => bail!("unknown run status {other:?}"),
        })
    }
}

/// A run as the report and the scheduler see it.
#[derive(Debug, Clone, Serialize)]
pub struct RunRow {
    pub id: i64,
    pub sweep_id: i64,
    pub status: RunStatus,
    pub params: serde_json::Value,
    #[serde(skip)]
    pub config: String,
    pub run_dir: String,
    pub device: Option<String>,
    pub pid: Option<i64>,
    pub step: i64,
    pub total_steps: Option<i64>,
    pub tokens: i64,
    pub loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub val_bpb: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub wall_s: f64,
    pub checkpoint: Option<String>,
    pub param_count: Option<i64>,
    pub mem_estimate: Option<i64>,
    pub error: Option<String>,
    /// The Slurm job the run is in while one is live (Slurm backend).
    pub slurm_job: Option<String>,
    /// How often the Slurm backend resubmitted it after a preemption, timeout or cancel.
    pub restarts: i64,
    #[serde(skip)]
    pub runner_pid: Option<i64>,
    /// Host and process start time of that runner (see [`runner_alive`]).
    #[serde(skip)]
    pub runner_host: Option<String>,
    #[serde(skip)]
    pub runner_started: Option<i64>,
    /// The highest early-stopping rung whose result the run recorded (0 is the first).
    pub rung: Option<i64>,
    /// Which sampler chose its values (`grid`, `random`, `tpe`).
    pub sampler: Option<String>,
    /// The trial number within its sweep (allocated by the store, never reused).
    #[serde(rename = "trial")]
    pub idx: i64,
    /// The early-stopping rung its engine was last sent to pause at (`None`: its end), set with its claim.
    #[serde(skip)]
    pub pause_rung: Option<i64>,
    /// Training FLOPs per token (forward + backward) and parameters outside the token embedding.
    pub flops_per_token: Option<f64>,
    pub params_non_embedding: Option<i64>,
    /// The compute budget (training FLOPs) of a run of an IsoFLOP study.
    pub budget: Option<f64>,
    /// The run this one forks from, and the step it starts at (its parent's checkpoint there).
    pub parent_id: Option<i64>,
    pub fork_step: Option<i64>,
}

/// A run of a new sweep, as [`RunStore::add_runs`] records it.
#[derive(Debug, Clone)]
pub struct NewRun {
    /// The swept values.
    pub params: BTreeMap<String, toml::Value>,
    /// The whole engine config (TOML).
    pub config: String,
    pub param_count: u64,
    /// Estimated peak bytes of one rank's training step.
    pub mem_estimate: u64,
    /// Which sampler chose the values (`grid`, `random`, `tpe`).
    pub sampler: Option<String>,
    /// Training FLOPs per token (forward + backward) and parameters outside the token embedding.
    pub flops_per_token: f64,
    pub params_non_embedding: u64,
    /// The compute budget (training FLOPs) of an IsoFLOP cell.
    pub budget: Option<f64>,
    /// A fork: the position of its parent among the runs added with it, and the step it forks at.
    pub fork: Option<(usize, u64)>,
}

impl NewRun {
    /// A run of `config` with the swept values `params`, its size and per-rank memory estimate computed for
    /// the data's `vocab` and `ranks` ranks.
    pub fn planned(
        params: BTreeMap<String, toml::Value>,
        config: &engine::train::TrainConfig,
        vocab: usize,
        ranks: usize,
        sampler: &str,
    ) -> Result<Self> {
        let model = config.model_config(vocab);
        Ok(Self {
            params,
            config: config.to_toml()?,
            param_count: model.param_count() as u64,
            mem_estimate: config.training_memory_estimate(&model, ranks),
            sampler: Some(sampler.into()),
            flops_per_token: model.flops_per_token(config.context_len),
            params_non_embedding: model.non_embedding_params() as u64,
            budget: None,
            fork: None,
        })
    }

    /// A trial whose values the engine refuses: recorded with its values and no config (never launched).
    pub fn refused(params: BTreeMap<String, toml::Value>, sampler: &str) -> Self {
        Self {
            params,
            config: String::new(),
            param_count: 0,
            mem_estimate: 0,
            sampler: Some(sampler.into()),
            flops_per_token: 0.0,
            params_non_embedding: 0,
            budget: None,
            fork: None,
        }
    }
}

#[cfg(test)]
impl NewRun {
    /// A run with no swept values and the given config, for tests.
    pub fn test(config: &str) -> Self {
        Self {
            params: BTreeMap::new(),
            config: config.into(),
            param_count: 10,
            mem_estimate: 20,
            sampler: None,
            flops_per_token: 60.0,
            params_non_embedding: 8,
            budget: None,
            fork: None,
        }
    }
}

/// One entry of a run's event log.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct EventRow {
    pub time: String,
    /// `status` (a status change), `runner`, `slurm`, `engine` (notes).
    pub kind: String,
    pub status: Option<String>,
    pub reason: Option<String>,
}

/// A checkpoint an engine reported.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct CheckpointRow {
    pub step: i64,
    pub path: String,
    pub bytes: i64,
    pub sha256: Option<String>,
}

impl RunRow {
    /// The pid of the runner that claimed this run, when that is another runner and it is still there
    /// (see [`runner_alive`]).
    pub fn other_live_runner(&self) -> Option<i64> {
        self.runner_pid.filter(|p| {
            *p as u32 != std::process::id()
                && runner_alive(*p, self.runner_host.as_deref(), self.runner_started)
        })
    }
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct SweepRow {
    pub id: i64,
    pub name: String,
    pub file: String,
    pub created_at: String,
}

/// Typeable ids: `7` is run 7, `s3` is sweep 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Id {
    Run(i64),
    Sweep(i64),
}

impl FromStr for Id {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let parsed = match s.strip_prefix('s').or_else(|| s.strip_prefix('S')) {
            Some(n) => n.parse().map(Id::Sweep),
            None => s.trim_start_matches(['r', 'R']).parse().map(Id::Run),
        };
        parsed.map_err(|_| {
            anyhow::anyhow!(
                "{s:?} is not an id: use a run id like 7 or a sweep id like s3 (see `runner ls`)"
            )
        })
    }
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Id::Run(r) => write!(f, "{r}"),
            Id::Sweep(s) => write!(f, "s{s}"),
        }
    }
}

pub fn now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // RFC 3339 in UTC, computed without a date crate.
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, dd) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The runner's home: `runs.db` and one folder per run.
#[derive(Clone)]
pub struct RunStore {
    /// Private: every statement is a method of the store.
    pool: SqlitePool,
    pub home: PathBuf,
}

/// This machine's host name (as the kernel reports it), naming the host of a runner's claims and locks.
pub fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

const RUN_COLUMNS: &str = "id, sweep_id, idx, status, params, config, run_dir, device, pid, step, total_steps, tokens, loss, val_loss, best_val_loss, val_bpb, tokens_per_s, wall_s, checkpoint, param_count, mem_estimate, error, slurm_job, restarts, runner_pid, runner_host, runner_started, rung, sampler, pause_rung, flops_per_token, params_non_embedding, budget, parent_id, fork_step";

impl<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> for RunRow {
    fn from_row(r: &'r sqlx::sqlite::SqliteRow) -> sqlx::Result<Self> {
        Ok(RunRow {
            id: r.try_get("id")?,
            sweep_id: r.try_get("sweep_id")?,
            idx: r.try_get("idx")?,
            status: r.try_get("status")?,
            params: serde_json::from_str(r.try_get::<&str, _>("params")?)
                .unwrap_or(serde_json::Value::Null),
            config: r.try_get("config")?,
            run_dir: r.try_get("run_dir")?,
            device: r.try_get("device")?,
            pid: r.try_get("pid")?,
            step: r.try_get("step")?,
            total_steps: r.try_get("total_steps")?,
            tokens: r.try_get("tokens")?,
            loss: r.try_get("loss")?,
            val_loss: r.try_get("val_loss")?,
            best_val_loss: r.try_get("best_val_loss")?,
            val_bpb: r.try_get("val_bpb")?,
            tokens_per_s: r.try_get("tokens_per_s")?,
            wall_s: r.try_get("wall_s")?,
            checkpoint: r.try_get("checkpoint")?,
            param_count: r.try_get("param_count")?,
            mem_estimate: r.try_get("mem_estimate")?,
            error: r.try_get("error")?,
            slurm_job: r.try_get("slurm_job")?,
            restarts: r.try_get("restarts")?,
            runner_pid: r.try_get("runner_pid")?,
            runner_host: r.try_get("runner_host")?,
            runner_started: r.try_get("runner_started")?,
            rung: r.try_get("rung")?,
            sampler: r.try_get("sampler")?,
            pause_rung: r.try_get("pause_rung")?,
            flops_per_token: r.try_get("flops_per_token")?,
            params_non_embedding: r.try_get("params_non_embedding")?,
            budget: r.try_get("budget")?,
            parent_id: r.try_get("parent_id")?,
            fork_step: r.try_get("fork_step")?,
        })
    }
}

/// A run or sweep id that names nothing: the dashboard answers 404, the command line says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NotFound {
    #[error("no run with id {0}: see `runner ls` for the ids")]
    Run(i64),
    #[error("no sweep with id s{0}: see `runner ls` for the ids")]
    Sweep(i64),
}

/// Allocate the next trial number of `sweep` (never reused, also after `runner rm`).
async fn next_trial(conn: &mut sqlx::SqliteConnection, sweep: i64) -> Result<i64> {
    sqlx::query_scalar::<_, i64>(
        "UPDATE sweeps SET next_trial = next_trial + 1 WHERE id = ? RETURNING next_trial - 1",
    )
    .bind(sweep)
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| NotFound::Sweep(sweep).into())
}

/// Insert one `queued` run (trial number `trial`, folder `parent/run-ID`) with its swept values and its
/// first event; returns its id.
async fn insert_run(
    conn: &mut sqlx::SqliteConnection,
    sweep_id: i64,
    trial: i64,
    run: &NewRun,
    parent: &Path,
) -> Result<i64> {
    let NewRun {
        params,
        config,
        param_count,
        mem_estimate: mem,
        sampler,
        flops_per_token,
        params_non_embedding,
        budget,
        fork: _,
    } = run;
    let params_json = serde_json::to_string(params)?;
    let id = sqlx::query(
        "INSERT INTO runs (sweep_id, idx, status, params, config, run_dir, param_count, mem_estimate, created_at, sampler, \
         flops_per_token, params_non_embedding, budget) VALUES (?, ?, 'queued', ?, ?, '', ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(sweep_id)
    .bind(trial)
    .bind(&params_json)
    .bind(config)
    // Stored as SQLite integers: an estimate past i64 (an absurd size) stays the largest one, never negative.
    .bind(i64::try_from(*param_count).unwrap_or(i64::MAX))
    .bind(i64::try_from(*mem).unwrap_or(i64::MAX))
    .bind(now())
    .bind(sampler)
    // A refused trial has no config, so no size.
    .bind(Some(*flops_per_token).filter(|f| *f > 0.0))
    .bind((*params_non_embedding > 0).then(|| i64::try_from(*params_non_embedding).unwrap_or(i64::MAX)))
    .bind(budget)
    .execute(&mut *conn)
    .await?
    .last_insert_rowid();
    let run_dir = parent.join(format!("run-{id}"));
    sqlx::query("UPDATE runs SET run_dir = ? WHERE id = ?")
        .bind(run_dir.display().to_string())
        .bind(id)
        .execute(&mut *conn)
        .await?;
    for (k, v) in params {
        let num = match v {
            toml::Value::Integer(i) => Some(*i as f64),
            toml::Value::Float(f) => Some(*f),
            _ => None,
        };
        let text = match v {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        sqlx::query("INSERT INTO run_params (run_id, key, value, num) VALUES (?, ?, ?, ?)")
            .bind(id)
            .bind(k)
            .bind(text)
            .bind(num)
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query("INSERT INTO events (run_id, time, kind, status, reason) VALUES (?, ?, 'status', 'queued', 'created')")
        .bind(id)
        .bind(now())
        .execute(&mut *conn)
        .await?;
    Ok(id)
}

async fn rung_results_of(conn: &mut sqlx::SqliteConnection, sweep: i64) -> Result<Vec<RungResult>> {
    let rows = sqlx::query("SELECT run_id, rung, value FROM rungs WHERE sweep_id = ? ORDER BY seq")
        .bind(sweep)
        .fetch_all(conn)
        .await?;
    Ok(rows
        .iter()
        .map(|r| RungResult {
            run: r.get("run_id"),
            rung: r.get::<i64, _>("rung") as usize,
            value: r.get("value"),
        })
        .collect())
}

/// The live runners other than this one registered on `sweep`; registrations of gone runners are deleted.
async fn live_runners_of(conn: &mut sqlx::SqliteConnection, sweep: i64) -> Result<Vec<i64>> {
    let rows = sqlx::query("SELECT pid, host, started FROM sweep_runners WHERE sweep_id = ?")
        .bind(sweep)
        .fetch_all(&mut *conn)
        .await?;
    let mut live = Vec::new();
    for r in rows {
        let (pid, host, started): (i64, String, Option<i64>) =
            (r.get("pid"), r.get("host"), r.get("started"));
        if pid as u32 == std::process::id() && host == this_host() {
            continue;
        }
        if runner_alive(pid, Some(&host), started) {
            live.push(pid);
        } else {
            sqlx::query("DELETE FROM sweep_runners WHERE sweep_id = ? AND pid = ? AND host = ?")
                .bind(sweep)
                .bind(pid)
                .bind(&host)
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(live)
}

/// The condition of a claim, bound as (id, status as read, rung as read): a run in a launchable state (a
/// paused one only once its engine has exited), not in a Slurm job, and unchanged since it was read.
const CLAIMABLE: &str = "id = ? AND status = ? AND rung IS ? \
    AND (status IN ('queued', 'interrupted', 'failed', 'pruned') OR (status = 'paused' AND pid IS NULL)) \
    AND slurm_job IS NULL";

/// Refuse a `--home` that is a file or holds no `runs.db`, saying what to do (commands that only read).
pub fn require_db(home: &Path) -> Result<()> {
    if home.exists() && !home.is_dir() {
        bail!(
            "--home {} is a file, not a folder: pass the folder that holds runs.db (default: runs)",
            home.display()
        );
    }
    if !home.join("runs.db").is_file() {
        bail!("no runs.db in {}: start a sweep first (`runner sweep experiments/quickstart.toml`) or pass --home", home.display());
    }
    Ok(())
}

/// The store's pool over `opts`: every connection gets the `pack_points` aggregate the history reads use.
async fn connect_pool(opts: SqliteConnectOptions) -> sqlx::Result<SqlitePool> {
    SqlitePoolOptions::new()
        .max_connections(4)
        .after_connect(|conn, _| {
            Box::pin(async move {
                let mut handle = conn.lock_handle().await?;
                crate::pack_points::register(handle.as_raw_handle())
                    .map_err(|e| sqlx::Error::Configuration(e.into()))
            })
        })
        .connect_with(opts)
        .await
}

impl RunStore {
    /// Open (creating if needed) `home/runs.db` and apply the migrations.
    pub async fn open(home: &Path) -> Result<Self> {
        std::fs::create_dir_all(home)
            .with_context(|| format!("creating runner home {}", home.display()))?;
        let db = home.join("runs.db");
        // Two runners starting on a fresh home would both switch the new file to WAL and try migration 1:
        // serialise connecting and migrating with a file lock (sqlx records applied migrations, so the
        // second runner finds none left to do).
        let lock_path = home.join("runs.db.migrate-lock");
        let lock = data_prep::fsutil::open_lock_file(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        let lock = tokio::task::spawn_blocking(move || lock.lock().map(|_| lock))
            .await?
            .with_context(|| format!("locking {}", lock_path.display()))?;
        let opts = SqliteConnectOptions::new()
            .filename(&db)
            .create_if_missing(true)
            .page_size(16384)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true)
            // Ingestion touches pages of many runs per transaction: keep them cached (64 MiB) and
            // checkpoint the WAL less often, so each page is written a few times, not once per batch.
            .pragma("cache_size", "-65536")
            .pragma("wal_autocheckpoint", "20000")
            .pragma("temp_store", "memory");
        // Migrations run on a connection of their own with foreign keys off: rebuilding a table that other
        // tables reference (SQLite's way to change a constraint) needs it, and it cannot be switched off
        // inside the migration's transaction.
        let migrated = async {
            let mut conn = opts.clone().foreign_keys(false).connect().await?;
            sqlx::migrate!("../migrations").run(&mut conn).await?;
            let broken: Vec<(String,)> =
                sqlx::query_as("SELECT \"table\" FROM pragma_foreign_key_check")
                    .fetch_all(&mut conn)
                    .await?;
            conn.close().await?;
            if let Some((table,)) = broken.first() {
                bail!("table {table} references rows that do not exist");
            }
            anyhow::Ok(())
        }
        .await;
        let pool = connect_pool(opts)
            .await
            .with_context(|| format!("opening {}", db.display()))?;
        drop(lock);
        migrated.with_context(|| format!("migrating {}", db.display()))?;
        Ok(Self {
            pool,
            home: home.to_path_buf(),
        })
    }

    /// Open an existing `home/runs.db` read-only (the dashboard): no migration, no write can happen through
    /// this store, and a database an older runner wrote (migrations pending) is refused with what to do.
    pub async fn open_read_only(home: &Path) -> Result<Self> {
        require_db(home)?;
        let db = home.join("runs.db");
        let opts = SqliteConnectOptions::new()
            .filename(&db)
            .read_only(true)
            .busy_timeout(Duration::from_secs(5))
            .pragma("cache_size", "-65536")
            .pragma("temp_store", "memory");
        let pool = connect_pool(opts)
            .await
            .with_context(|| format!("opening {} read-only", db.display()))?;
        let have: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
            .fetch_one(&pool)
            .await
            .with_context(|| format!("reading {}", db.display()))?;
        let want = sqlx::migrate!("../migrations")
            .iter()
            .map(|m| m.version)
            .max()
            .unwrap_or(0);
        if have.unwrap_or(0) < want {
            bail!(
                "{} was written by an older runner (schema {} < {want}): run `runner ls --home {}` once to upgrade it",
                db.display(),
                have.unwrap_or(0),
                home.display()
            );
        }
        Ok(Self {
            pool,
            home: home.to_path_buf(),
        })
    }

    pub async fn create_sweep(&self, name: &str, file: &str, spec: &str) -> Result<i64> {
        let id =
            sqlx::query("INSERT INTO sweeps (name, file, spec, created_at) VALUES (?, ?, ?, ?)")
                .bind(name)
                .bind(file)
                .bind(spec)
                .bind(now())
                .execute(&self.pool)
                .await?
                .last_insert_rowid();
        Ok(id)
    }

    /// Record the runs of a sweep as `queued` (one transaction), their folders under `runs_dir` (default:
    /// the home). Returns their ids.
    pub async fn add_runs(
        &self,
        sweep_id: i64,
        runs: &[NewRun],
        runs_dir: Option<&Path>,
    ) -> Result<Vec<i64>> {
        let parent = std::path::absolute(runs_dir.unwrap_or(&self.home))
            .context("resolving the runs folder")?;
        let mut tx = self.pool.begin().await?;
        let mut ids = Vec::with_capacity(runs.len());
        for run in runs {
            let trial = next_trial(&mut tx, sweep_id).await?;
            let id = insert_run(&mut tx, sweep_id, trial, run, &parent).await?;
            if let Some((of, step)) = run.fork {
                let Some(parent_id) = ids.get(of) else {
                    bail!("run {} forks from a run added after it", ids.len());
                };
                sqlx::query("UPDATE runs SET parent_id = ?, fork_step = ? WHERE id = ?")
                    .bind(parent_id)
                    .bind(step as i64)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            ids.push(id);
        }
        tx.commit().await?;
        Ok(ids)
    }

    /// Make the next trial of a sampling sweep (`queued`) in one write transaction, so that runners sharing
    /// the home never make more than `max` trials between them nor share a trial number: `make(trial, runs,
    /// rung results)` chooses its values from the sweep as it is inside the transaction. `None` when the
    /// sweep has `max` runs already.
    pub async fn add_trial(
        &self,
        sweep_id: i64,
        max: usize,
        runs_dir: Option<&Path>,
        make: impl FnOnce(u64, &[RunRow], &[RungResult]) -> Result<NewRun>,
    ) -> Result<Option<RunRow>> {
        let parent = std::path::absolute(runs_dir.unwrap_or(&self.home))
            .context("resolving the runs folder")?;
        // IMMEDIATE: the write lock first, so that no other runner adds a trial between the read and the
        // insert (and no read-then-write upgrade fails with "database is locked").
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let runs: Vec<RunRow> = sqlx::query_as(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE sweep_id = ? ORDER BY id"
        ))
        .bind(sweep_id)
        .fetch_all(&mut *tx)
        .await?;
        if runs.len() >= max {
            return Ok(None);
        }
        let results = rung_results_of(&mut tx, sweep_id).await?;
        let trial = next_trial(&mut tx, sweep_id).await?;
        let row = make(trial as u64, &runs, &results)?;
        let id = insert_run(&mut tx, sweep_id, trial, &row, &parent).await?;
        let run = sqlx::query_as(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?"))
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(run))
    }

    /// Register this runner as following `sweeps` (until [`Self::leave_sweep`]).
    pub async fn join_sweeps(&self, sweeps: &[i64]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for s in sweeps {
            sqlx::query(
                "INSERT OR REPLACE INTO sweep_runners (sweep_id, pid, host, started) VALUES (?, ?, ?, ?)",
            )
            .bind(s)
            .bind(std::process::id() as i64)
            .bind(this_host())
            .bind(process_start(std::process::id() as i64))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Stop following `sweep`; `true` when no other live runner follows it (this runner was the last, and
    /// ends the search). Registrations of runners that are gone are dropped on the way. One write
    /// transaction: of two runners leaving at once, exactly one is the last.
    pub async fn leave_sweep(&self, sweep: i64) -> Result<bool> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let me = std::process::id() as i64;
        sqlx::query("DELETE FROM sweep_runners WHERE sweep_id = ? AND pid = ? AND host = ?")
            .bind(sweep)
            .bind(me)
            .bind(this_host())
            .execute(&mut *tx)
            .await?;
        let others = live_runners_of(&mut tx, sweep).await?;
        tx.commit().await?;
        Ok(others.is_empty())
    }

    /// The pids of the live runners (other than this one) following `sweep`.
    pub async fn sweep_runners(&self, sweep: i64) -> Result<Vec<i64>> {
        let mut conn = self.pool.acquire().await?;
        live_runners_of(&mut conn, sweep).await
    }

    /// Claim `run` for this runner, as it was read: only one runner wins, and only while the run is still
    /// what the caller saw (its status and rung unchanged: a stale copy of a run another runner has since
    /// trained and paused claims nothing). `pause_rung` is the rung its engine is sent to pause at, recorded
    /// in the same transaction: the `paused` event that engine ends with is the result at that rung.
    pub async fn claim(
        &self,
        run: &RunRow,
        device: &str,
        pause_rung: Option<usize>,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(&format!(
            "UPDATE runs SET status = 'running', device = ?, runner_pid = ?, runner_host = ?, runner_started = ?, pid = NULL, \
             error = NULL, started_at = ?, pause_rung = ? WHERE {CLAIMABLE}"
        ))
        .bind(device)
        .bind(std::process::id() as i64)
        .bind(this_host())
        .bind(process_start(std::process::id() as i64))
        .bind(now())
        .bind(pause_rung.map(|r| r as i64))
        .bind(run.id)
        .bind(run.status.as_str())
        .bind(run.rung)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 1 {
            sqlx::query("INSERT INTO events (run_id, time, kind, status, reason) VALUES (?, ?, 'status', 'running', ?)")
                .bind(run.id)
                .bind(now())
                .bind(format!("launched on {device}"))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    /// Claim `run` (as read, see [`Self::claim`]) for a Slurm submission by this runner: it stays `queued`
    /// (the job is pending) with `slurm_job = 'submitting'` until [`Self::set_slurm_job`] records the id.
    pub async fn claim_for_slurm(&self, run: &RunRow, pause_rung: Option<usize>) -> Result<bool> {
        let n = sqlx::query(&format!(
            "UPDATE runs SET status = 'queued', slurm_job = 'submitting', device = 'slurm', runner_pid = ?, runner_host = ?, \
             runner_started = ?, pid = NULL, error = NULL, restarts = 0, pause_rung = ? WHERE {CLAIMABLE}"
        ))
        .bind(std::process::id() as i64)
        .bind(this_host())
        .bind(process_start(std::process::id() as i64))
        .bind(pause_rung.map(|r| r as i64))
        .bind(run.id)
        .bind(run.status.as_str())
        .bind(run.rung)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Follow a run whose Slurm job outlived its runner: this runner becomes its runner. Only one wins.
    pub async fn adopt_slurm_job(
        &self,
        id: i64,
        job: &str,
        old_runner: Option<i64>,
    ) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE runs SET runner_pid = ?, runner_host = ?, runner_started = ? \
             WHERE id = ? AND slurm_job = ? AND runner_pid IS ?",
        )
        .bind(std::process::id() as i64)
        .bind(this_host())
        .bind(process_start(std::process::id() as i64))
        .bind(id)
        .bind(job)
        .bind(old_runner)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Record the Slurm job a run is now in (`None` once it has ended); `restarted` counts a resubmission.
    pub async fn set_slurm_job(&self, id: i64, job: Option<&str>, restarted: bool) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE runs SET slurm_job = ?, restarts = restarts + ? WHERE id = ?")
            .bind(job)
            .bind(i64::from(restarted))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if let Some(job) = job {
            let what = if restarted {
                "resubmitted"
            } else {
                "submitted"
            };
            sqlx::query("INSERT INTO events (run_id, time, kind, status, reason) VALUES (?, ?, 'slurm', NULL, ?)")
                .bind(id)
                .bind(now())
                .bind(format!("{what} as Slurm job {job}"))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A fork that cannot start from its parent's checkpoint becomes an ordinary run (from step 0).
    pub async fn clear_fork(&self, id: i64, why: &str) -> Result<()> {
        sqlx::query("UPDATE runs SET parent_id = NULL, fork_step = NULL WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        self.note(id, "runner", why).await
    }

    /// Note something about a run in its event log (no status change).
    pub async fn note(&self, id: i64, kind: &str, reason: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO events (run_id, time, kind, status, reason) VALUES (?, ?, ?, NULL, ?)",
        )
        .bind(id)
        .bind(now())
        .bind(kind)
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Change a run's status and record why.
    pub async fn set_status(&self, id: i64, status: RunStatus, reason: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let finished = matches!(
            status,
            RunStatus::Completed
                | RunStatus::Failed
                | RunStatus::Interrupted
                | RunStatus::SkippedOom
                | RunStatus::Paused
                | RunStatus::Pruned
        );
        let error = matches!(status, RunStatus::Failed | RunStatus::SkippedOom).then_some(reason);
        sqlx::query(
            "UPDATE runs SET status = ?, error = COALESCE(?, error), pid = CASE WHEN ? THEN NULL ELSE pid END, \
             slurm_job = CASE WHEN ? THEN NULL ELSE slurm_job END, \
             finished_at = CASE WHEN ? THEN ? ELSE finished_at END WHERE id = ?",
        )
        .bind(status.as_str())
        .bind(error)
        .bind(finished)
        .bind(finished)
        .bind(finished)
        .bind(now())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO events (run_id, time, kind, status, reason) VALUES (?, ?, 'status', ?, ?)",
        )
        .bind(id)
        .bind(now())
        .bind(status.as_str())
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Whether `run` is left `running` on this host by a runner that is gone (killed): its engine, if any,
    /// is checkpointing and exiting (the parent-death signal) and nobody will record how it ends.
    pub fn abandoned(&self, run: &RunRow) -> bool {
        run.status == RunStatus::Running
            && run.slurm_job.is_none()
            && run.runner_host.as_deref().is_none_or(|h| h == this_host())
            && run
                .runner_pid
                .is_none_or(|p| p as u32 != std::process::id())
            && run.other_live_runner().is_none()
    }

    /// Mark an [`Self::abandoned`] run `interrupted` so that it can be claimed again; `false` when another
    /// runner changed it meanwhile.
    pub async fn release_abandoned(&self, run: &RunRow) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE runs SET status = 'interrupted', finished_at = ? \
             WHERE id = ? AND status = 'running' AND slurm_job IS NULL AND runner_pid IS ?",
        )
        .bind(now())
        .bind(run.id)
        .bind(run.runner_pid)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 1 {
            sqlx::query("INSERT INTO events (run_id, time, kind, status, reason) VALUES (?, ?, 'status', 'interrupted', ?)")
                .bind(run.id)
                .bind(now())
                .bind("its runner was killed; resumed (after its engine's last checkpoint)")
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    /// Record a run's result at early-stopping rung `rung` (idempotent: a rung is recorded once);
    /// `paused`: the run stopped there and waits for the rule.
    pub async fn record_rung(
        &self,
        run: i64,
        sweep: i64,
        rung: usize,
        (budget, value): (f64, f64),
        paused: bool,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT OR IGNORE INTO rungs (run_id, sweep_id, rung, budget, value, time) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(run)
        .bind(sweep)
        .bind(rung as i64)
        .bind(budget)
        .bind(value)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        // A pause is recorded with its status in one transaction: a runner killed right after cannot leave
        // the result without the `paused` that keeps the run from training past the rung unpromoted.
        // (A Slurm run's job is still live then: its status follows the job's end, as the adoption of a
        // job whose runner died reads the pause from its metrics.jsonl.)
        sqlx::query(
            "UPDATE runs SET rung = MAX(COALESCE(rung, -1), ?), \
             status = CASE WHEN ? AND slurm_job IS NULL THEN 'paused' ELSE status END WHERE id = ?",
        )
        .bind(rung as i64)
        .bind(paused)
        .bind(run)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The budget a run had used when it recorded rung `rung`.
    pub async fn rung_budget(&self, run: i64, rung: usize) -> Result<Option<f64>> {
        Ok(
            sqlx::query_scalar("SELECT budget FROM rungs WHERE run_id = ? AND rung = ?")
                .bind(run)
                .bind(rung as i64)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// The rung column alone (a run that completed: the rung past its last pause).
    pub async fn set_rung(&self, run: i64, rung: usize) -> Result<()> {
        sqlx::query("UPDATE runs SET rung = ? WHERE id = ?")
            .bind(rung as i64)
            .bind(run)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A paused run whose runner was killed before the engine's end was recorded still names that engine
    /// (`pid`): clear it, so that the run can be claimed (a live runner's paused run stays unclaimable until
    /// its engine has exited).
    pub async fn release_paused(&self, run: &RunRow) -> Result<()> {
        let gone = run
            .runner_pid
            .is_none_or(|p| p as u32 != std::process::id())
            && run.other_live_runner().is_none();
        if run.status == RunStatus::Paused && run.pid.is_some() && gone {
            sqlx::query("UPDATE runs SET pid = NULL WHERE id = ? AND status = 'paused'")
                .bind(run.id)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// Every rung result of a sweep, in the order they arrived.
    pub async fn rung_results(&self, sweep: i64) -> Result<Vec<RungResult>> {
        let mut conn = self.pool.acquire().await?;
        rung_results_of(&mut conn, sweep).await
    }

    /// SQLite's own check of the database file ("ok" when intact).
    pub async fn integrity_check(&self) -> Result<String> {
        Ok(sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(&self.pool)
            .await?)
    }

    /// The pool, for tests elsewhere in the crate that need a raw statement.
    #[cfg(test)]
    pub(crate) fn pool_for_tests(&self) -> &SqlitePool {
        &self.pool
    }

    /// The stored sweep file (JSON) of sweep `id`.
    pub async fn sweep_spec(&self, id: i64) -> Result<String> {
        Ok(sqlx::query_scalar("SELECT spec FROM sweeps WHERE id = ?")
            .bind(id)
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn set_pid(&self, id: i64, pid: u32) -> Result<()> {
        sqlx::query("UPDATE runs SET pid = ? WHERE id = ?")
            .bind(pid as i64)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Runs left `running` on this host by a runner that is gone, whose engine is gone too, become
    /// `interrupted`. Runs in a Slurm job are left alone (the job may outlive its runner, and the Slurm
    /// backend adopts it on resume), as are runs claimed on another host (a home on a shared filesystem).
    pub async fn recover_orphans(&self) -> Result<Vec<i64>> {
        let rows =
            sqlx::query("SELECT id, pid, runner_pid, run_dir, runner_host, runner_started FROM runs \
                         WHERE status = 'running' AND slurm_job IS NULL AND (runner_host IS NULL OR runner_host = ?)")
                .bind(this_host())
                .fetch_all(&self.pool)
                .await?;
        let mut recovered = Vec::new();
        for r in rows {
            let id: i64 = r.get(0);
            let pid: Option<i64> = r.get(1);
            let runner_pid: Option<i64> = r.get(2);
            let run_dir: String = r.get(3);
            let engine_alive = pid.is_some_and(|p| process_mentions(p, &run_dir));
            let runner_alive = runner_pid.is_some_and(|p| {
                let host: Option<String> = r.get(4);
                p as u32 != std::process::id() && runner_alive(p, host.as_deref(), r.get(5))
            });
            if !engine_alive && !runner_alive {
                self.set_status(
                    id,
                    RunStatus::Interrupted,
                    "its runner and engine are gone (recovered at start)",
                )
                .await?;
                recovered.push(id);
            }
        }
        Ok(recovered)
    }

    pub async fn run(&self, id: i64) -> Result<RunRow> {
        sqlx::query_as(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| NotFound::Run(id).into())
    }

    pub async fn sweep(&self, id: i64) -> Result<SweepRow> {
        let row = sqlx::query_as("SELECT id, name, file, created_at FROM sweeps WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.ok_or_else(|| NotFound::Sweep(id).into())
    }

    pub async fn sweeps(&self) -> Result<Vec<SweepRow>> {
        Ok(
            sqlx::query_as("SELECT id, name, file, created_at FROM sweeps ORDER BY id")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Runs of one sweep (or all), in id order.
    pub async fn runs(&self, sweep: Option<i64>) -> Result<Vec<RunRow>> {
        let q = match sweep {
            Some(_) => format!("SELECT {RUN_COLUMNS} FROM runs WHERE sweep_id = ? ORDER BY id"),
            None => format!("SELECT {RUN_COLUMNS} FROM runs ORDER BY id"),
        };
        let mut query = sqlx::query_as(&q);
        if let Some(s) = sweep {
            query = query.bind(s);
        }
        Ok(query.fetch_all(&self.pool).await?)
    }

    /// (step, value) series of one metric of a run.
    pub async fn metric(&self, run: i64, name: &str) -> Result<Vec<(i64, f64)>> {
        let rows = sqlx::query(
            "SELECT step, value FROM metrics WHERE run_id = ? AND name = ? ORDER BY step",
        )
        .bind(run)
        .bind(name)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Every metric series of a set of runs: run → name → [(step, value)]. SQLite packs each series into one
    /// JSON array (one row per run and metric instead of one per point), which is what makes reading the
    /// history of many runs fast.
    pub async fn histories(
        &self,
        runs: &[i64],
    ) -> Result<BTreeMap<i64, BTreeMap<String, Vec<(i64, f64)>>>> {
        self.histories_of(runs, None).await
    }

    /// The history of one metric (e.g. `loss`) of each of `runs`.
    pub async fn history(
        &self,
        runs: &[i64],
        name: &str,
    ) -> Result<BTreeMap<i64, Vec<(i64, f64)>>> {
        Ok(self
            .histories_of(runs, Some(name))
            .await?
            .into_iter()
            .filter_map(|(run, mut m)| Some((run, m.remove(name)?)))
            .collect())
    }

    /// Every metric of `runs`, or only `name`, as (step, value) series sorted by step: one packed blob per
    /// (run, metric) from the `pack_points` aggregate.
    async fn histories_of(
        &self,
        runs: &[i64],
        name: Option<&str>,
    ) -> Result<BTreeMap<i64, BTreeMap<String, Vec<(i64, f64)>>>> {
        let mut out: BTreeMap<i64, BTreeMap<String, Vec<(i64, f64)>>> = BTreeMap::new();
        let only = if name.is_some() { "AND name = ?" } else { "" };
        for chunk in runs.chunks(500) {
            let marks = vec!["?"; chunk.len()].join(",");
            let q = format!(
                // Grouping straight off the primary key (run_id, name, step) walks it in order: no
                // temporary B-tree (an ORDER BY subquery made SQLite sort every point again).
                "SELECT run_id, name, pack_points(step, value) FROM metrics \
                 WHERE run_id IN ({marks}) {only} GROUP BY run_id, name"
            );
            let mut query = sqlx::query(&q);
            for id in chunk {
                query = query.bind(id);
            }
            if let Some(n) = name {
                query = query.bind(n);
            }
            for r in query.fetch_all(&self.pool).await? {
                let series = crate::pack_points::unpack(r.get::<&[u8], _>(2));
                out.entry(r.get(0)).or_default().insert(r.get(1), series);
            }
        }
        Ok(out)
    }

    /// The event log of a run (status changes and notes), oldest first.
    pub async fn events(&self, run: i64) -> Result<Vec<EventRow>> {
        Ok(sqlx::query_as(
            "SELECT time, kind, status, reason FROM events WHERE run_id = ? ORDER BY id",
        )
        .bind(run)
        .fetch_all(&self.pool)
        .await?)
    }

    /// How many engine starts (and resumptions) the event log has for a run: the `start` events of its
    /// `metrics.jsonl` ingested so far.
    pub async fn engine_starts(&self, run: i64) -> Result<usize> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM events WHERE run_id = ? AND kind = 'engine' \
             AND (reason LIKE 'engine started at step %' OR reason LIKE 'engine resumed at step %')",
        )
        .bind(run)
        .fetch_one(&self.pool)
        .await?;
        Ok(n as usize)
    }

    /// The checkpoints recorded for a run, by step.
    pub async fn checkpoints(&self, run: i64) -> Result<Vec<CheckpointRow>> {
        Ok(sqlx::query_as(
            "SELECT step, path, bytes, sha256 FROM checkpoints WHERE run_id = ? ORDER BY step",
        )
        .bind(run)
        .fetch_all(&self.pool)
        .await?)
    }
}

/// Whether process `pid` exists and has not exited: a zombie (exited, not yet reaped by its parent) or a
/// dying process (`Z`, `X` in `/proc/PID/stat`) is gone, though its `/proc` entry is still there.
pub(crate) fn process_alive(pid: i64) -> bool {
    process_state(pid).is_some_and(|s| !matches!(s, 'Z' | 'X' | 'x'))
}

/// The state letter of process `pid` (`/proc/PID/stat` field 3), `None` when there is no such process.
fn process_state(pid: i64) -> Option<char> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// Start time of process `pid` in clock ticks after boot (`/proc/PID/stat` field 22).
pub(crate) fn process_start(pid: i64) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name (which may itself hold spaces): state is field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Whether the runner that claimed a run is still there. On another host it cannot be checked and counts
/// as alive; here its pid must exist and, when its start time was recorded, have started then (a pid the
/// kernel handed to another process since is not that runner).
pub(crate) fn runner_alive(pid: i64, host: Option<&str>, started: Option<i64>) -> bool {
    if host.is_some_and(|h| h != this_host()) {
        return true;
    }
    process_alive(pid) && started.is_none_or(|t| process_start(pid) == Some(t))
}

/// Whether process `pid` exists and its command line mentions `needle` (guards against pid reuse).
pub(crate) fn process_mentions(pid: i64, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(needle))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse() {
        assert_eq!("7".parse::<Id>().unwrap(), Id::Run(7));
        assert_eq!("s3".parse::<Id>().unwrap(), Id::Sweep(3));
        assert!("x9"
            .parse::<Id>()
            .unwrap_err()
            .to_string()
            .contains("runner ls"));
    }

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_418), (2025, 11, 26));
        assert!(now().ends_with('Z'));
    }

    #[tokio::test]
    async fn orphans_are_recovered_on_their_own_host_only() -> Result<()> {
        let d = tempfile::tempdir()?;
        let store = RunStore::open(d.path()).await?;
        let s = store.create_sweep("t", "f.toml", "{}").await?;
        let row = || NewRun::test("dim = 8");
        let ids = store
            .add_runs(s, &[row(), row(), row(), row()], None)
            .await?;
        for id in &ids {
            assert!(store.claim(&store.run(*id).await?, "cpu", None).await?);
        }
        // Both claims' runner is gone (a pid that cannot exist) and neither has an engine.
        sqlx::query("UPDATE runs SET runner_pid = 2147483000")
            .execute(&store.pool)
            .await?;
        sqlx::query("UPDATE runs SET runner_host = 'another-machine' WHERE id = ?")
            .bind(ids[1])
            .execute(&store.pool)
            .await?;
        // pid 1 exists; as runs 2 and 3's runner it started at another time (a reused pid) or at its own.
        for (id, started) in [(ids[2], Some(-1)), (ids[3], process_start(1))] {
            sqlx::query("UPDATE runs SET runner_pid = 1, runner_started = ? WHERE id = ?")
                .bind(started)
                .bind(id)
                .execute(&store.pool)
                .await?;
        }
        assert_eq!(store.recover_orphans().await?, vec![ids[0], ids[2]]);
        assert_eq!(store.run(ids[1]).await?.status, RunStatus::Running);
        assert_eq!(store.run(ids[3]).await?.status, RunStatus::Running);
        Ok(())
    }

    /// Fault 4: a runner that exited but was not reaped yet (a zombie) is gone, though `/proc/PID` exists.
    #[test]
    fn a_zombie_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i64;
        let t0 = std::time::Instant::now();
        while process_state(pid) != Some('Z') {
            assert!(t0.elapsed() < Duration::from_secs(10), "no zombie");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        assert!(!process_alive(pid));
        assert!(!runner_alive(pid, Some(&this_host()), process_start(pid)));
        child.wait().unwrap();
        assert!(process_alive(std::process::id() as i64));
    }

    /// Fault 1: a stale copy of a run (read while queued) claims nothing once another runner has trained
    /// and paused it; the claim records the rung the engine is sent to, and a pause is recorded there.
    #[tokio::test]
    async fn a_stale_copy_claims_nothing_and_the_claim_holds_the_rung() -> Result<()> {
        let d = tempfile::tempdir()?;
        let store = RunStore::open(d.path()).await?;
        let s = store.create_sweep("t", "f.toml", "{}").await?;
        let ids = store.add_runs(s, &[NewRun::test("dim = 8")], None).await?;
        let stale = store.run(ids[0]).await?;
        assert!(store.claim(&stale, "cpu", Some(0)).await?);
        assert_eq!(store.run(ids[0]).await?.pause_rung, Some(0));
        store.record_rung(ids[0], s, 0, (10.0, 2.5), true).await?;
        store
            .set_status(ids[0], RunStatus::Paused, "paused at its rung")
            .await?;
        assert!(
            !store.claim(&stale, "cpu", None).await?,
            "a queued copy of a paused run must not launch it unpromoted"
        );
        let paused = store.run(ids[0]).await?;
        assert_eq!((paused.status, paused.rung), (RunStatus::Paused, Some(0)));
        assert!(store.claim(&paused, "cpu", Some(1)).await?);
        assert_eq!(store.run(ids[0]).await?.pause_rung, Some(1));
        // Trial numbers come from the sweep's counter: never reused after a removal.
        let more = store
            .add_runs(s, &[NewRun::test("dim = 8"), NewRun::test("dim = 8")], None)
            .await?;
        store.set_status(more[1], RunStatus::Failed, "x").await?;
        store.remove_run(more[1]).await?;
        let next = store.add_runs(s, &[NewRun::test("dim = 8")], None).await?;
        let idx: Vec<i64> = store.runs(Some(s)).await?.iter().map(|r| r.idx).collect();
        assert_eq!(idx, vec![0, 1, 3]);
        assert_eq!(store.run(next[0]).await?.idx, 3);
        Ok(())
    }

    #[tokio::test]
    async fn statuses_and_claims() -> Result<()> {
        let d = tempfile::tempdir()?;
        let store = RunStore::open(d.path()).await?;
        let s = store.create_sweep("t", "f.toml", "{}").await?;
        let mut p = BTreeMap::new();
        p.insert("n_layers".to_string(), toml::Value::Integer(2));
        let ids = store
            .add_runs(
                s,
                &[NewRun {
                    params: p,
                    ..NewRun::test("dim = 8")
                }],
                None,
            )
            .await?;
        let queued = store.run(ids[0]).await?;
        assert!(store.claim(&queued, "cpu", None).await?);
        assert!(
            !store.claim(&queued, "cpu", None).await?,
            "a running run cannot be claimed twice"
        );
        store.set_status(ids[0], RunStatus::Failed, "boom").await?;
        let r = store.run(ids[0]).await?;
        assert_eq!(
            (r.status.as_str(), r.error.as_deref()),
            ("failed", Some("boom"))
        );
        let n: i64 =
            sqlx::query_scalar("SELECT num FROM run_params WHERE run_id = ? AND key = 'n_layers'")
                .bind(ids[0])
                .fetch_one(&store.pool)
                .await
                .map(|v: f64| v as i64)?;
        assert_eq!(n, 2);
        // Histories come back per run and metric, sorted by step (a NaN is refused by the NOT NULL column).
        for (step, value) in [(3, 0.5), (1, 2.0), (2, f64::NAN)] {
            sqlx::query(
                "INSERT INTO metrics (run_id, name, step, value, time) VALUES (?, 'loss', ?, ?, 0)",
            )
            .bind(ids[0])
            .bind(step)
            .bind(value)
            .execute(&store.pool)
            .await
            .ok();
        }
        sqlx::query(
            "INSERT INTO metrics (run_id, name, step, value, time) VALUES (?, 'lr', 1, 0.1, 0)",
        )
        .bind(ids[0])
        .execute(&store.pool)
        .await?;
        let loss = store.history(&ids, "loss").await?;
        assert_eq!(loss[&ids[0]], vec![(1, 2.0), (3, 0.5)]);
        let all = store.histories(&ids).await?;
        assert_eq!(all[&ids[0]].len(), 2);
        assert_eq!(all[&ids[0]]["lr"], vec![(1, 0.1)]);
        assert!(store
            .run(999)
            .await
            .unwrap_err()
            .to_string()
            .contains("runner ls"));
        Ok(())
    }
}
