//! Where runs execute. One [`Executor`] interface — launch a run, follow it, signal it, adopt it after a
//! restart — with two backends behind it: [`local::Local`] (engine processes on this machine's devices)
//! and [`slurm::Slurm`] (one `sbatch` job per run). [`execute`] is the one loop both share: it takes runs
//! off the queue while the backend has room, skips those whose memory estimate exceeds the limit, records
//! how each ended, and handles Ctrl-C/SIGTERM; the backends only know how to start and watch engines.

pub mod local;
pub mod slurm;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use engine::events::Event;
use tokio::sync::mpsc;

use crate::display::Display;
use crate::early_stop::{next_promotion, EarlyStop};
use crate::ingest::{self, Msg};
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
    /// claims it), to stop at `pause_at` (an early-stopping rung) or run to its end.
    async fn launch(&mut self, run: RunRow, pause_at: Option<PauseAt>) -> Result<Launch>;
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

/// Run `runs` (already `queued`/`interrupted`/`failed` in the store) with the backend of `res`.
/// A sweep whose trials are sampled as results arrive (`strategy = "tpe"`), and the ranks of a run (for
/// a new trial's memory estimate).
pub struct Sampler {
    pub sweep: crate::spec::Sweep,
    pub ranks: usize,
}

/// How the sweeps being run search: `early` maps a sweep id to its `[early_stop]` (sweeps without one, or
/// a run resumed on its own to full length, have none); `samplers` the sweeps that sample their trials.
#[derive(Default)]
pub struct SearchPlan {
    pub early: HashMap<i64, EarlyStop>,
    pub samplers: HashMap<i64, Sampler>,
}

pub async fn execute(
    store: &RunStore,
    runs: Vec<RunRow>,
    res: &Resources,
    engine: &EngineCommand,
    plan: SearchPlan,
) -> Result<Summary> {
    let (writer, writer_task) = ingest::spawn_writer(store.clone());
    let mut total = runs.len();
    for (sweep, s) in &plan.samplers {
        total += s
            .sweep
            .trials
            .saturating_sub(store.runs(Some(*sweep)).await?.len());
    }
    let mut display = Display::new(total);
    let search = Search {
        store: store.clone(),
        samplers: plan.samplers,
        early: plan
            .early
            .into_iter()
            .filter(|(_, e)| e.enabled())
            .collect(),
        runs: HashMap::new(),
        active: Default::default(),
        taken: Default::default(),
    };
    let result = match res.backend {
        Backend::Local => {
            let exec = local::Local::new(store, res, engine.clone(), writer.clone())?;
            drive(store, runs, exec, search, &writer, &mut display).await
        }
        Backend::Slurm => {
            let exec = slurm::Slurm::new(store, res, engine.clone(), writer.clone()).await?;
            drive(store, runs, exec, search, &writer, &mut display).await
        }
    };
    ingest::flush(&writer).await;
    drop(writer);
    writer_task.await.context("the DB writer panicked")??;
    display.overall.finish_and_clear();
    result
}

/// The early-stopping state the driver keeps: which sweeps search, and for each launched run its sweep and
/// the rung it was sent to (everything else is in the store, so a resumed runner continues the search).
struct Search {
    store: RunStore,
    early: HashMap<i64, EarlyStop>,
    samplers: HashMap<i64, Sampler>,
    /// run → (sweep, config, rung it will pause at when it pauses).
    runs: HashMap<i64, (i64, engine::train::TrainConfig, usize)>,
    /// Runs whose engine has not ended yet (a paused one may still be exiting): not promotable.
    active: std::collections::HashSet<i64>,
    /// Runs another runner claimed first: not offered again in this loop.
    taken: std::collections::HashSet<i64>,
}

impl Search {
    /// Where `run` stops next: its next rung, or `None` for the end (or without early stopping).
    fn pause_at(&mut self, run: &RunRow) -> Option<PauseAt> {
        let es = self.early.get(&run.sweep_id)?;
        let cfg = engine::train::TrainConfig::from_table(&run.config.parse().ok()?).ok()?;
        let pause = es.pause_at(&cfg, run.rung);
        let next = run.rung.map_or(0, |r| r as usize + 1);
        self.runs.insert(run.id, (run.sweep_id, cfg, next));
        pause
    }

    /// Record what a run's event says about its rung: a `paused` event is the result at the rung it was
    /// sent to; a `done` one the result at the full length (the last rung).
    async fn record(&self, run: i64, ev: &Event) -> Result<()> {
        let Some((sweep, cfg, rung)) = self.runs.get(&run) else {
            return Ok(());
        };
        let es = &self.early[sweep];
        let value = |loss: f64, bpb: f64| match es.metric {
            crate::early_stop::Metric::ValLoss => loss,
            crate::early_stop::Metric::ValBpb => bpb,
        };
        match ev {
            Event::Paused {
                step,
                tokens,
                elapsed_s,
                val_loss,
                val_bpb,
            } => {
                let used = es.budget.used(*step, *tokens, *elapsed_s);
                self.store
                    .record_rung(run, *sweep, *rung, (used, value(*val_loss, *val_bpb)), true)
                    .await
            }
            // The end of the run: its rung column says so; no rung result (a full length is not the same
            // budget across configurations, so it is not compared).
            Event::Done { .. } => {
                let top = es.rungs_of(cfg).map(|r| r.len()).unwrap_or(*rung);
                self.store.set_rung(run, top).await
            }
            _ => Ok(()),
        }
    }

    /// The paused run the rule promotes next, over every searching sweep (a run being launched is not
    /// paused any more in the store). `end`: nothing runs or waits to start, so the search would end here;
    /// a sweep none of whose runs completed then continues its best run at the highest rung reached (with
    /// fewer than eta runs at a rung, the rule alone would keep none of them).
    async fn promotion(&self, end: bool) -> Result<Option<RunRow>> {
        for (sweep, es) in &self.early {
            let results = self.store.rung_results(*sweep).await?;
            let runs = self.store.runs(Some(*sweep)).await?;
            let paused: Vec<(i64, usize)> = runs
                .iter()
                .filter(|r| r.status == RunStatus::Paused)
                .filter(|r| !self.active.contains(&r.id) && !self.taken.contains(&r.id))
                .filter_map(|r| Some((r.id, r.rung? as usize)))
                .collect();
            let mut id = next_promotion(es.method, es.reduction_factor, &results, &paused);
            if id.is_none() && end && !runs.iter().any(|r| r.status == RunStatus::Completed) {
                id = crate::early_stop::best_waiting(&results, &paused);
            }
            if let Some(id) = id {
                return Ok(runs.into_iter().find(|r| r.id == id));
            }
        }
        Ok(None)
    }

    /// A new trial of a sampling sweep, recorded `queued` (with the sampler that chose it), while its budget
    /// lasts: the point TPE suggests from the trials so far — completed ones by their final metric,
    /// paused and pruned ones by their last rung's, running ones as pending.
    async fn new_trial(&self) -> Result<Option<RunRow>> {
        for (sweep, sm) in &self.samplers {
            loop {
                let runs = self.store.runs(Some(*sweep)).await?;
                if runs.len() >= sm.sweep.trials {
                    break;
                }
                let metric = self.early.get(sweep).map(|e| e.metric);
                let rung_values = self.store.rung_results(*sweep).await?;
                let point_of = |r: &RunRow| -> crate::tpe::Point {
                    serde_json::from_value(r.params.clone()).unwrap_or_default()
                };
                let (mut history, mut pending) = (Vec::new(), Vec::new());
                for r in &runs {
                    let value = match r.status {
                        RunStatus::Completed => match metric {
                            Some(crate::early_stop::Metric::ValBpb) => r.val_bpb,
                            _ => r.val_loss,
                        },
                        // Stopped at a rung (for now, or for good): judged by its last rung's value,
                        // as Optuna judges pruned trials by their intermediate values.
                        RunStatus::Pruned | RunStatus::Paused => rung_values
                            .iter()
                            .filter(|x| x.run == r.id)
                            .max_by_key(|x| x.rung)
                            .map(|x| x.value),
                        RunStatus::Queued | RunStatus::Running | RunStatus::Interrupted => {
                            pending.push(point_of(r));
                            continue;
                        }
                        RunStatus::Failed | RunStatus::SkippedOom => None,
                    };
                    if let Some(value) = value.filter(|v| v.is_finite()) {
                        history.push(crate::tpe::Trial {
                            point: point_of(r),
                            value,
                        });
                    }
                }
                let trial = runs.len() as u64;
                let point =
                    crate::tpe::suggest(&sm.sweep.space, &history, &pending, sm.sweep.seed, trial);
                let sampler = if history.len() < crate::tpe::STARTUP_TRIALS {
                    "random"
                } else {
                    "tpe"
                };
                let planned = crate::spec::plan_config(
                    &sm.sweep.spec,
                    &sm.sweep.file,
                    sm.sweep.vocab,
                    &point,
                );
                let row = match &planned {
                    Ok(cfg) => {
                        let model = cfg.model_config(sm.sweep.vocab);
                        crate::store::NewRun {
                            params: point.clone(),
                            config: cfg.to_toml()?,
                            param_count: model.param_count() as u64,
                            mem_estimate: cfg.training_memory_estimate(&model, sm.ranks),
                            sampler: Some(sampler.into()),
                        }
                    }
                    Err(_) => crate::store::NewRun {
                        params: point.clone(),
                        config: String::new(),
                        param_count: 0,
                        mem_estimate: 0,
                        sampler: Some(sampler.into()),
                    },
                };
                let ids = self
                    .store
                    .add_runs(*sweep, &[row], sm.sweep.spec.resources.runs_dir.as_deref())
                    .await?;
                match planned {
                    Ok(_) => return Ok(Some(self.store.run(ids[0]).await?)),
                    // A point the engine would refuse (a dim n_heads does not divide): a failed trial.
                    Err(e) => {
                        self.store
                            .set_status(ids[0], RunStatus::Failed, &engine::error_line(&e))
                            .await?
                    }
                }
            }
        }
        Ok(None)
    }

    /// A run that recorded its result at a rung and then ended `interrupted` or `failed` (its engine's
    /// teardown, its job's end) without going past that rung: it is paused there, waiting for the rule —
    /// resuming it towards its next rung would skip the decision.
    async fn still_at_rung(&self, run: &RunRow) -> Result<bool> {
        let (Some(es), Some(rung)) = (self.early.get(&run.sweep_id), run.rung) else {
            return Ok(false);
        };
        if !matches!(run.status, RunStatus::Interrupted | RunStatus::Failed) {
            return Ok(false);
        }
        let recorded = self.store.rung_budget(run.id, rung as usize).await?;
        let used = es
            .budget
            .used(run.step as u64, run.tokens as u64, run.wall_s);
        Ok(recorded.is_some_and(|b| used <= b * (1.0 + 1e-9)))
    }

    /// The search is over: every run still paused can never be promoted; it becomes `pruned`.
    async fn prune_rest(&self, display: &mut Display, summary: &mut Summary) -> Result<()> {
        for (sweep, es) in &self.early {
            for r in self.store.runs(Some(*sweep)).await? {
                if r.status != RunStatus::Paused {
                    continue;
                }
                let rung = r.rung.unwrap_or(0);
                let at =
                    engine::train::TrainConfig::from_table(&r.config.parse().unwrap_or_default())
                        .ok()
                        .and_then(|cfg| es.rungs_of(&cfg).ok())
                        .and_then(|rungs| rungs.get(rung as usize).copied())
                        .map_or(String::new(), |b| format!(" at {b} {}", es.budget.as_str()));
                let why = format!(
                    "{}: not promoted past rung {rung}{at}; checkpoint kept, `runner resume {}` trains it to full length",
                    es.describe(),
                    r.id
                );
                self.store.set_status(r.id, RunStatus::Pruned, &why).await?;
                display.line(format!("run {}: pruned ({why})", r.id));
                summary.count(RunStatus::Pruned);
            }
        }
        Ok(())
    }
}

/// The loop every backend shares.
async fn drive<E: Executor>(
    store: &RunStore,
    runs: Vec<RunRow>,
    mut exec: E,
    mut search: Search,
    writer: &mpsc::UnboundedSender<Msg>,
    display: &mut Display,
) -> Result<Summary> {
    let mut summary = Summary::default();
    // Paused runs wait for the rule (also one that ended badly right after its rung result was
    // recorded); everything else is launched in order.
    let mut waiting = Vec::new();
    for r in runs {
        if search.still_at_rung(&r).await? {
            let why = "its rung result was recorded before it stopped: waiting for the early-stopping rule";
            store.set_status(r.id, RunStatus::Paused, why).await?;
            continue;
        }
        if r.status != RunStatus::Paused || !search.early.contains_key(&r.sweep_id) {
            waiting.push(r);
        }
    }
    let runs = waiting;
    // A run adopted in a live job is registered with the search as it was launched (its next rung), and
    // counts as active until it ends.
    let queue: Vec<RunRow> = {
        let mut pause_of = |r: &RunRow| {
            search.active.insert(r.id);
            search.pause_at(r)
        };
        exec.adopt(runs, &mut pause_of, display).await?
    };
    for r in &queue {
        search.active.remove(&r.id);
    }
    let mut queue: VecDeque<RunRow> = queue.into();
    let (mut stopping, mut detach) = (false, false);
    let mut busy = false;
    // Whether the search (promotions, new trials) may have something to launch: its answer changes only
    // when a run ends or a launch did not happen, so it is asked then, not on every step event.
    let mut search_due = true;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        // Launch while there is room: a promotion first (ASHA starts new configurations only when nothing
        // can be promoted), then the queue, then a new trial of a sampling sweep.
        while !stopping && exec.has_room() {
            let end = exec.active() == 0 && queue.is_empty();
            let promoted = match search_due {
                true => search.promotion(end).await?,
                false => None,
            };
            let next = match promoted.or_else(|| queue.pop_front()) {
                Some(run) => Some(run),
                None if search_due => search.new_trial().await?,
                None => None,
            };
            let Some(run) = next else {
                search_due = false;
                break;
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
            let was_paused = run.status == RunStatus::Paused;
            let pause_at = search.pause_at(&run);
            match exec.launch(run, pause_at).await? {
                Launch::Started(place) => {
                    search.active.insert(id);
                    busy = false;
                    let to = pause_at.map_or("to the end".to_string(), |p| format!("to {p}"));
                    if was_paused {
                        display.line(format!("run {id}: promoted, continues {to}"));
                    }
                    match pause_at {
                        Some(p) => display.started(id, &format!("{place}, until {p}")),
                        None => display.started(id, &place),
                    }
                }
                Launch::Busy(run) => {
                    if !busy {
                        display.line("waiting for GPUs that another runner is using…".into());
                    }
                    busy = true;
                    // A promoted run is asked for again (it is still paused in the store).
                    search_due = true;
                    if !was_paused {
                        queue.push_front(*run);
                    }
                    break;
                }
                Launch::Taken => {
                    search_due = true;
                    search.taken.insert(id);
                    display.line(format!("run {id}: taken by another runner, skipping"));
                }
                Launch::Failed { reason, stop_all } => {
                    search_due = true;
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
            _ = tokio::signal::ctrl_c() => Some(true),
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
                    search.record(run, &ev).await?;
                    display.event(run, &ev);
                    let _ = writer.send(Msg::Event(run, ev));
                }
                Update::Status(run, status, why) => store.set_status(run, status, &why).await?,
                Update::Ended(run, status, why) => {
                    search.active.remove(&run);
                    search_due = true;
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
    if !stopping && !detach && queue.is_empty() {
        search.prune_rest(display, &mut summary).await?;
    }
    for sweep in search.early.keys() {
        summary.paused += store
            .runs(Some(*sweep))
            .await?
            .iter()
            .filter(|r| r.status == RunStatus::Paused)
            .count();
    }
    summary.left_queued = queue.len();
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
