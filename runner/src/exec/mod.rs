//! Where runs execute. One [`Executor`] interface — launch a run, follow it, signal it, adopt it after a
//! restart — with two backends behind it: [`local::Local`] (engine processes on this machine's devices)
//! and [`slurm::Slurm`] (one `sbatch` job per run). [`execute`] is the one loop both share: it takes runs
//! off the queue while the backend has room, skips those whose memory estimate exceeds the limit, records
//! how each ended, and handles Ctrl-C/SIGTERM; the backends only know how to start and watch engines.

pub mod local;
pub mod slurm;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use engine::events::Event;
use tokio::sync::mpsc;

use crate::display::Display;
use crate::ingest::{self, Msg};
use crate::search::{Next, Pause, Sampler, Search, SweepSearch};
use crate::spec::{Backend, Resources};
use crate::store::{RunRow, RunStatus, RunStore};
use engine::train::budget::PauseAt;
use std::collections::HashMap;

/// How to start an engine: a separate `engine` binary, or this runner's hidden `engine` subcommand.
#[derive(Debug, Clone)]
pub struct EngineCommand {
    pub program: PathBuf,
    pub prefix: Vec<String>,
}

impl EngineCommand {
    /// `RUNNER_ENGINE` (path to an engine binary, e.g. a CUDA build) or else this runner itself, which
    /// embeds the same engine (`runner engine train ...`), so the two can never be out of date.
    pub fn detect() -> Result<Self> {
        if let Ok(p) = std::env::var("RUNNER_ENGINE") {
            let program = PathBuf::from(p);
            if !program.is_file() {
                bail!(
                    "RUNNER_ENGINE={} is not a file: point it at an engine binary",
                    program.display()
                );
            }
            return Ok(Self {
                program,
                prefix: Vec::new(),
            });
        }
        Ok(Self {
            program: std::env::current_exe().context("locating the runner binary")?,
            prefix: vec!["engine".into()],
        })
    }
}

/// One `engine train` command line for a run dir: resume it if it holds an engine's `config.toml`, else
/// start it from the runner's `run.toml`; on `device`, pausing at `pause_at`. Rendered as arguments for a
/// process started here ([`Self::args`]) or as a shell line that makes the resume-or-start choice when it
/// runs ([`Self::shell`], a batch script resubmitted as is).
pub struct TrainCommand<'a> {
    pub engine: &'a EngineCommand,
    pub run_dir: &'a Path,
    pub device: &'a str,
    pub pause_at: Option<PauseAt>,
}

impl TrainCommand<'_> {
    /// The words after `train`'s mode: `--set device=…` and `--pause-at …`.
    fn options(&self) -> Vec<String> {
        let mut out = vec!["--set".to_string(), format!("device=\"{}\"", self.device)];
        if let Some(p) = self.pause_at {
            out.extend(["--pause-at".to_string(), p.to_string()]);
        }
        out
    }

    /// The engine's arguments (after the program), `resume` deciding the mode.
    pub fn args(&self, resume: bool) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = self.engine.prefix.iter().map(Into::into).collect();
        args.push("train".into());
        let dir = self.run_dir.as_os_str().to_owned();
        if resume {
            args.extend(["--resume".into(), dir]);
        } else {
            args.extend([
                "--config".into(),
                self.run_dir.join("run.toml").into_os_string(),
                "--out".into(),
                dir,
            ]);
        }
        args.extend(self.options().into_iter().map(Into::into));
        args
    }

    /// Shell lines that run the engine under `launcher` (e.g. `srun …`), choosing resume or start by
    /// whether the run dir holds a `config.toml` at that moment.
    pub fn shell(&self, launcher: &str) -> String {
        let q = slurm::sh_quote(&self.run_dir.display().to_string());
        let mut engine = vec![slurm::sh_quote(&self.engine.program.display().to_string())];
        engine.extend(self.engine.prefix.iter().map(|p| slurm::sh_quote(p)));
        // Plain words stay bare (`--set`, `--pause-at`, `tokens=192`); anything else is quoted.
        let word = |w: &String| {
            if w.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:+".contains(c))
            {
                w.clone()
            } else {
                slurm::sh_quote(w)
            }
        };
        let options: Vec<String> = self.options().iter().map(word).collect();
        format!(
            "if [ -f {q}/config.toml ]; then\n  set -- --resume {q}\nelse\n  set -- --config {q}/run.toml --out {q}\nfi\n\
             exec {launcher} {} train \"$@\" {}\n",
            engine.join(" "),
            options.join(" ")
        )
    }
}

/// Refuse to run sweeps while an `ENGINE_<KEY>` variable of the run config is set: every engine (local
/// processes and Slurm jobs alike inherit the environment) would take it over the sweep's value, while
/// `runs.db`, `run.toml` and the report say the swept one. What the store records must be what trained.
pub fn check_engine_env() -> Result<()> {
    let keys = engine::train::config::known_keys();
    for (name, value) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let Some(key) = name.strip_prefix("ENGINE_") else {
            continue;
        };
        if let Some(key) = keys.iter().find(|k| k.eq_ignore_ascii_case(key)) {
            bail!(
                "{name}={} is set in the environment: it would override {key} in every run of the sweep while runs.db records the sweep's values; unset it (`unset {name}`) and put the value in the sweep file ([base] {key} = …) or pass --set base.{key}=…",
                value.to_string_lossy()
            );
        }
    }
    Ok(())
}

/// Counts of how runs ended.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub completed: usize,
    pub failed: usize,
    pub interrupted: usize,
    pub skipped_oom: usize,
    pub left_queued: usize,
    /// Paused at a rung and not promoted when the search ended (resumable).
    pub pruned: usize,
    /// Still paused (the search was stopped before it could decide).
    pub paused: usize,
}

impl Summary {
    fn count(&mut self, status: RunStatus) {
        match status {
            RunStatus::Completed => self.completed += 1,
            RunStatus::Interrupted => self.interrupted += 1,
            RunStatus::SkippedOom => self.skipped_oom += 1,
            RunStatus::Pruned => self.pruned += 1,
            RunStatus::Queued | RunStatus::Running | RunStatus::Paused => {}
            RunStatus::Failed => self.failed += 1,
        }
    }
}

/// What [`Executor::launch`] did with a run.
pub enum Launch {
    /// Started (on the devices or as the job named).
    Started(String),
    /// No room right now (devices another runner holds): try again after the next update.
    Busy(Box<RunRow>),
    /// Another runner claimed it first.
    Taken,
    /// Could not be started; the run failed with this reason. `stop_all`: every further launch would
    /// fail alike (a bad Slurm setting), so launch no more.
    Failed { reason: String, stop_all: bool },
}

/// What a backend reports about the runs it follows.
pub enum Update {
    /// A protocol event of a run (goes to the DB writer and the display).
    Event(i64, Event),
    /// A run changed status without ending (a pending Slurm job started or was requeued).
    Status(i64, RunStatus, String),
    /// A run ended: its final status and why.
    Ended(i64, RunStatus, String),
    /// A line for the user.
    Line(String),
}

/// What a Ctrl-C or SIGTERM did.
#[derive(Debug, PartialEq, Eq)]
pub enum Interrupt {
    /// The engines were asked to stop; keep following them until they have.
    Stopping,
    /// Stop following: what still runs is left to `runner resume` (Slurm jobs outlive their runner).
    Detach,
}

/// A place runs execute. The driver ([`execute`]) calls these from one task, never concurrently.
#[allow(async_fn_in_trait)]
pub trait Executor {
    /// Runs of `runs` still live elsewhere (a Slurm job whose runner is gone) are followed again, with the
    /// rung each was sent to (`pause_of`); the rest are returned, to be launched.
    async fn adopt(
        &mut self,
        runs: Vec<RunRow>,
        pause_of: &mut dyn FnMut(&RunRow) -> Option<PauseAt>,
        display: &mut Display,
    ) -> Result<Vec<RunRow>>;
    /// Whether one more run could start now.
    fn has_room(&self) -> bool;
    /// Runs being followed.
    fn active(&self) -> usize;
    /// The memory one run may use, in GiB, and what that limit is (for the skip reason).
    fn memory_limit(&self) -> Option<(f64, String)>;
    /// Start `run` (already `queued`/`interrupted`/`failed`/`paused`/`pruned` in the store; the backend
    /// claims it as it is, recording `pause`'s rung with the claim), to stop at `pause` (an early-stopping
    /// rung) or run to its end.
    async fn launch(&mut self, run: RunRow, pause: Option<Pause>) -> Result<Launch>;
    /// Wait until there may be updates. Must be cancel-safe: the driver races it against signals.
    async fn wait(&mut self);
    /// What happened since the last call.
    async fn updates(&mut self) -> Result<Vec<Update>>;
    /// Ctrl-C (`second`: again) or SIGTERM (`terminal`: false) arrived.
    async fn interrupt(&mut self, second: bool, terminal: bool, display: &mut Display)
        -> Interrupt;
}

/// The ranks of one run and the memory one run may use (GiB, and what that limit is), as the backend of
/// `res` sees them: for the memory estimate recorded with each run and the dry run's "will be skipped".
pub async fn plan(res: &Resources) -> (usize, Option<(f64, String)>) {
    match res.backend {
        Backend::Local => {
            let (devices, limit) = local::resolve_devices(res);
            (
                local::ranks_per_run(res, &devices),
                limit.map(|l| (l, local::limit_text(l))),
            )
        }
        Backend::Slurm => {
            let ranks = if slurm::uses_gpus(res).await {
                res.gpus_per_run
            } else {
                res.procs_per_run
            };
            (ranks, slurm::memory_limit(res))
        }
    }
}

/// Run `runs` (already `queued`/`interrupted`/`failed`/`paused` in the store) with the backend of `res`,
/// searching `sweeps` as each says (its sampler, its early-stopping rule).
pub async fn execute(
    store: &RunStore,
    runs: Vec<RunRow>,
    res: &Resources,
    engine: &EngineCommand,
    sweeps: HashMap<i64, SweepSearch>,
) -> Result<Summary> {
    let (writer, writer_task) = ingest::spawn_writer(store.clone());
    let mut total = runs.len();
    for (id, s) in &sweeps {
        if let Sampler::Tpe { sweep, .. } = &s.sampler {
            total += sweep
                .trials
                .saturating_sub(store.runs(Some(*id)).await?.len());
        }
    }
    let mut display = Display::new(total);
    let search = Search::new(store, sweeps, runs);
    search.join().await?;
    let result = match res.backend {
        Backend::Local => {
            let exec = local::Local::new(store, res, engine.clone(), writer.clone())?;
            drive(store, exec, search, &writer, &mut display).await
        }
        Backend::Slurm => {
            let exec = slurm::Slurm::new(store, res, engine.clone(), writer.clone()).await?;
            drive(store, exec, search, &writer, &mut display).await
        }
    };
    ingest::flush(&writer).await;
    drop(writer);
    writer_task.await.context("the DB writer panicked")??;
    display.overall.finish_and_clear();
    result
}

/// The loop every backend shares: launch what the search says while there is room, follow the runs,
/// tell the search what happened.
async fn drive<E: Executor>(
    store: &RunStore,
    mut exec: E,
    mut search: Search,
    writer: &mpsc::UnboundedSender<Msg>,
    display: &mut Display,
) -> Result<Summary> {
    // Ctrl-C and SIGTERM are caught from here on, before anything launches: a signal right after a launch
    // stops the engines through `interrupt`, never kills the runner with its engines unrecorded.
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut summary = Summary::default();
    for s in search.reconcile(writer).await? {
        display.finished(s.run, s.status, &s.why);
        summary.count(s.status);
    }
    // A run adopted in a live job counts as active until it ends, pausing where its claim sent it.
    let adopting = search.adopting();
    let rest = {
        let mut pause_of = |r: &RunRow| search.pause_of_launched(r);
        exec.adopt(adopting, &mut pause_of, display).await?
    };
    search.adopted(rest);
    let (mut stopping, mut detach) = (false, false);
    let mut busy = false;
    loop {
        while !stopping && exec.has_room() {
            let Some(next) = search.next(exec.active() == 0).await? else {
                break;
            };
            let (run, pause, promoted) = match next {
                Next::Launch {
                    run,
                    pause,
                    promoted,
                } => (run, pause, promoted),
                Next::Refuse { run, reason } => {
                    search.failed();
                    store.set_status(run.id, RunStatus::Failed, &reason).await?;
                    display.finished(run.id, RunStatus::Failed, &reason);
                    summary.count(RunStatus::Failed);
                    continue;
                }
            };
            if let (Some((limit, what)), Some(est)) = (exec.memory_limit(), run.mem_estimate) {
                let need = est as f64 / (1u64 << 30) as f64;
                if need > limit {
                    let why = format!(
                        "needs about {}, {what}",
                        engine::device::gib_text(est as u64)
                    );
                    store
                        .set_status(run.id, RunStatus::SkippedOom, &why)
                        .await?;
                    display.finished(run.id, RunStatus::SkippedOom, &why);
                    summary.count(RunStatus::SkippedOom);
                    continue;
                }
            }
            let id = run.id;
            match exec.launch(run, pause).await? {
                Launch::Started(place) => {
                    search.launched(id);
                    busy = false;
                    let to = pause.map_or("to the end".to_string(), |p| format!("to {}", p.at));
                    if promoted {
                        display.line(format!("run {id}: promoted, continues {to}"));
                    }
                    match pause {
                        Some(p) => display.started(id, &format!("{place}, until {}", p.at)),
                        None => display.started(id, &place),
                    }
                }
                Launch::Busy(run) => {
                    if !busy {
                        display.line("waiting for GPUs that another runner is using…".into());
                    }
                    busy = true;
                    search.busy(*run, promoted);
                    break;
                }
                Launch::Taken => {
                    search.taken(id);
                    display.line(format!("run {id}: taken by another runner, skipping"));
                }
                Launch::Failed { reason, stop_all } => {
                    search.failed();
                    store.set_status(id, RunStatus::Failed, &reason).await?;
                    display.finished(id, RunStatus::Failed, &reason);
                    summary.count(RunStatus::Failed);
                    if stop_all {
                        display.line("not launching more runs: fix the [resources] settings and `runner resume` the sweep".into());
                        stopping = true;
                    }
                }
            }
        }
        // Nothing running: done, unless a launch waits for devices another runner holds.
        if detach || (exec.active() == 0 && (stopping || !busy)) {
            break;
        }
        let signal = tokio::select! {
            () = exec.wait() => None,
            _ = sigint.recv() => Some(true),
            _ = sigterm.recv() => Some(false),
        };
        if let Some(terminal) = signal {
            if exec.interrupt(stopping, terminal, display).await == Interrupt::Detach {
                detach = true;
            }
            stopping = true;
        }
        for update in exec.updates().await? {
            match update {
                Update::Event(run, ev) => {
                    search.observe(run, &ev).await?;
                    display.event(run, &ev);
                    let _ = writer.send(Msg::Event(run, ev));
                }
                Update::Status(run, status, why) => store.set_status(run, status, &why).await?,
                Update::Ended(run, status, why) => {
                    search.ended(run);
                    // The run's last events are in the DB before its final status.
                    ingest::flush(writer).await;
                    store.set_status(run, status, &why).await?;
                    display.finished(run, status, &why);
                    summary.count(status);
                }
                Update::Line(text) => display.line(text),
            }
        }
    }
    if detach && exec.active() > 0 {
        summary.interrupted += exec.active();
    }
    summary.pruned += search.finish(stopping || detach, display).await?;
    for sweep in search.searching() {
        summary.paused += store
            .runs(Some(sweep))
            .await?
            .iter()
            .filter(|r| r.status == RunStatus::Paused)
            .count();
    }
    summary.left_queued = search.left_queued();
    Ok(summary)
}

/// Prepare a run's folder for a fresh start or a resume: the folder, and `run.toml` (the config the runner
/// recorded) unless the engine already wrote its own `config.toml` (then the engine resumes from it).
/// Returns whether the engine resumes.
pub async fn prepare_run_dir(store: &RunStore, run: &RunRow) -> Result<bool> {
    let dir = Path::new(&run.run_dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if dir.join("config.toml").is_file() {
        return Ok(true);
    }
    if run.step > 0 {
        // The engine's start event at step 0 then clears the old metrics and checkpoint rows.
        let why = format!(
            "run dir {} is gone (it had reached step {}): starting the run over from step 0",
            dir.display(),
            run.step
        );
        store.note(run.id, "runner", &why).await?;
        tracing::warn!("run {}: {why}", run.id);
    }
    let cfg = dir.join("run.toml");
    std::fs::write(&cfg, &run.config).with_context(|| format!("writing {}", cfg.display()))?;
    Ok(false)
}
