//! The search: which run to launch next and what a run's results mean for the others. One [`Search`] per
//! runner, which the executor's loop asks "what next?" ([`Search::next`]) and tells what happened
//! ([`Search::launched`], [`Search::observe`], [`Search::ended`], ...). Everything it decides on is read
//! from the store, never from a copy a stale row could overwrite: a run's rung comes from its claim
//! (`runs.pause_rung`, written in the claim's transaction), trial numbers are allocated by the store, and
//! the search ends in the runner that leaves a sweep last.
//!
//! - [`space`]: the search space of a sweep file (lists, ranges), grid and random expansion;
//! - [`tpe`]: the Tree-structured Parzen Estimator that samples trials as results arrive;
//! - [`early_stop`]: ASHA and the median rule over runs paused at their rungs.
//!
//! A new strategy adds its file here, a variant of [`Sampler`] or a rule beside [`early_stop`], and its
//! keys in `spec.rs`'s `[sweep]` parsing; the executors and the store do not change.

pub mod early_stop;
pub mod isoflop;
pub mod space;
pub mod tpe;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;

use anyhow::Result;
use engine::events::Event;
use engine::train::budget::PauseAt;
use engine::train::TrainConfig;
use tokio::sync::mpsc;

use crate::display::Display;
use crate::ingest::{self, Msg};
use crate::store::{NewRun, RunRow, RunStatus, RunStore};
pub use early_stop::Pause;
use early_stop::{best_waiting, next_promotion, EarlyStop, Metric};

/// Whether a queued run can start now: not a fork, or a fork whose checkpoint is in place.
fn ready(run: &RunRow) -> bool {
    run.parent_id.is_none() || isoflop::forked(run)
}

/// How a sweep makes its runs: all planned up front (grid, random), or sampled one by one as results
/// arrive (TPE), with the ranks of one run (for a new trial's memory estimate).
pub enum Sampler {
    Planned,
    Tpe {
        sweep: Box<crate::spec::Sweep>,
        ranks: usize,
    },
}

/// How one sweep searches: its sampler and its early-stopping rule (`None`: every run to its end, as for
/// a run resumed on its own).
pub struct SweepSearch {
    pub sampler: Sampler,
    pub early: Option<EarlyStop>,
}

/// What to do next.
pub enum Next {
    /// Launch `run` (claimed as it is here), to pause at `pause` or to run to its end.
    Launch {
        run: RunRow,
        pause: Option<Pause>,
        promoted: bool,
    },
    /// `run` cannot be launched (values the engine refuses, a stored config that does not parse): it
    /// fails with `reason`.
    Refuse { run: RunRow, reason: String },
}

/// A run the search settled without launching it (on [`Search::reconcile`]), for the summary.
pub struct Settled {
    pub run: i64,
    pub status: RunStatus,
    pub why: String,
}

/// The search state of one runner over the sweeps it runs.
pub struct Search {
    store: RunStore,
    sweeps: HashMap<i64, SweepSearch>,
    /// Runs to launch in order (planned runs, resumed ones), ahead of new trials.
    queue: VecDeque<RunRow>,
    /// Each run's config, decoded once (a run's config never changes).
    configs: HashMap<i64, TrainConfig>,
    /// Runs whose engine this runner follows (a paused one may still be exiting): not promotable.
    active: HashSet<i64>,
    /// Runs whose claim failed since the last thing happened: not offered again until something does.
    tried: HashSet<i64>,
    /// Whether promotions or new trials may have changed since they were last asked for (a run ended, a
    /// launch did not happen): asked then, not on every step event.
    due: bool,
}

impl Search {
    /// A search over `sweeps`, launching `runs` (already `queued`/`interrupted`/`failed`/`paused` in the
    /// store) first.
    pub fn new(store: &RunStore, sweeps: HashMap<i64, SweepSearch>, runs: Vec<RunRow>) -> Self {
        Self {
            store: store.clone(),
            sweeps,
            queue: runs.into(),
            configs: HashMap::new(),
            active: HashSet::new(),
            tried: HashSet::new(),
            due: true,
        }
    }

    /// The sweeps searched and those of the queued runs: this runner follows them until [`Self::finish`].
    pub async fn join(&self) -> Result<()> {
        let mut ids: Vec<i64> = self.sweeps.keys().copied().collect();
        ids.extend(self.queue.iter().map(|r| r.sweep_id));
        ids.sort_unstable();
        ids.dedup();
        self.store.join_sweeps(&ids).await
    }

    /// Before anything launches: take in what each queued run's engine wrote while no runner followed it
    /// (a runner killed, or stopped, while it trained): a run that paused at its rung records that result
    /// and waits for the rule; a run that finished is completed. A run whose rung result was recorded and
    /// that then ended badly waits for the rule too. Returns the runs settled so.
    pub async fn reconcile(&mut self, writer: &mpsc::UnboundedSender<Msg>) -> Result<Vec<Settled>> {
        let mut settled = Vec::new();
        let mut keep = VecDeque::new();
        for run in std::mem::take(&mut self.queue) {
            // A live Slurm job is the executor's to adopt; a new run has nothing to take in.
            if run.slurm_job.is_some()
                || !matches!(run.status, RunStatus::Interrupted | RunStatus::Failed)
            {
                keep.push_back(run);
                continue;
            }
            let metrics = Path::new(&run.run_dir).join("metrics.jsonl");
            let starts = self.store.engine_starts(run.id).await?;
            let ended = ingest::backfill(writer, run.id, &metrics, starts);
            if let Some(ev) = &ended {
                let _ = writer.send(Msg::Event(run.id, ev.clone()));
            }
            ingest::flush(writer).await;
            match ended {
                Some(ev @ Event::Paused { .. }) if self.early_of(run.sweep_id).is_some() => {
                    self.observe(run.id, &ev).await?;
                    let why = "it paused at its rung while no runner followed it: waiting for the early-stopping rule";
                    self.store
                        .set_status(run.id, RunStatus::Paused, why)
                        .await?;
                    continue;
                }
                Some(ev @ Event::Done { .. }) => {
                    self.observe(run.id, &ev).await?;
                    let why = "its engine finished while no runner followed it".to_string();
                    self.store
                        .set_status(run.id, RunStatus::Completed, &why)
                        .await?;
                    settled.push(Settled {
                        run: run.id,
                        status: RunStatus::Completed,
                        why,
                    });
                    continue;
                }
                _ => {}
            }
            let run = self.store.run(run.id).await?;
            if self.still_at_rung(&run).await? {
                let why = "its rung result was recorded before it stopped: waiting for the early-stopping rule";
                self.store
                    .set_status(run.id, RunStatus::Paused, why)
                    .await?;
                continue;
            }
            keep.push_back(run);
        }
        // Paused runs of a search wait for the rule; everything else is launched in order.
        keep.retain(|r| r.status != RunStatus::Paused || self.early_of(r.sweep_id).is_none());
        self.queue = keep;
        Ok(settled)
    }

    /// Runs of the queue still live elsewhere are handed to the executor to adopt: each is active from
    /// here, and `pause_of` gives the rung its engine was sent to (from its claim).
    pub fn adopting(&mut self) -> Vec<RunRow> {
        let runs: Vec<RunRow> = self.queue.drain(..).collect();
        self.active.extend(runs.iter().map(|r| r.id));
        runs
    }

    /// The runs the executor did not adopt go back to the queue, in order.
    pub fn adopted(&mut self, rest: Vec<RunRow>) {
        for r in &rest {
            self.active.remove(&r.id);
        }
        self.queue = rest.into();
    }

    /// Where a run launched earlier (an adopted Slurm job) pauses: the rung its claim recorded.
    pub fn pause_of_launched(&mut self, run: &RunRow) -> Option<PauseAt> {
        let rung = usize::try_from(run.pause_rung?).ok()?;
        let es = self.early_of(run.sweep_id)?.clone();
        let cfg = self.config(run).ok()?;
        let value = *es.rungs_of(cfg).ok()?.get(rung)?;
        Some(PauseAt {
            unit: es.budget,
            value,
        })
    }

    /// The next run to launch, if any: a promotion first (ASHA starts new configurations only when
    /// nothing can be promoted), then the queue, then a new trial of a sampling sweep. `idle`: the
    /// executor follows no run, so with an empty queue the search would end here.
    pub async fn next(&mut self, idle: bool) -> Result<Option<Next>> {
        if self.due {
            if let Some(parent) = self.paused_parent().await? {
                return Ok(Some(self.launch_parent(parent).await?));
            }
            if let Some(run) = self.promotion(idle && self.queue.is_empty()).await? {
                return Ok(Some(self.launch(run, true)));
            }
        }
        // The first queued run that can start: a fork only once its parent's checkpoint is forked into it.
        if idle && !self.queue.is_empty() && !self.queue.iter().any(ready) {
            self.unblock_forks().await?;
        }
        if let Some(i) = self.queue.iter().position(ready) {
            let run = self.queue.remove(i).expect("in the queue");
            // Only a run of an IsoFLOP study (it has a budget) can have forks: no read for the others.
            let has_children = run.budget.is_some() && self.children(&run).await?.next().is_some();
            return Ok(Some(if has_children {
                self.launch_parent(run).await?
            } else {
                self.launch(run, false)
            }));
        }
        if self.due {
            if let Some(next) = self.new_trial().await? {
                return Ok(Some(next));
            }
        }
        self.due = false;
        Ok(None)
    }

    /// The runs forking from `parent`.
    async fn children(&self, parent: &RunRow) -> Result<impl Iterator<Item = RunRow>> {
        let id = parent.id;
        Ok(self
            .store
            .runs(Some(parent.sweep_id))
            .await?
            .into_iter()
            .filter(move |r| r.parent_id == Some(id)))
    }

    /// Nothing here runs and every queued run is a fork waiting for its parent: a parent that will not
    /// get there (it ended, or is past the point) gives what it has — its checkpoint at the fork point when
    /// it still exists — and otherwise the fork trains from step 0.
    async fn unblock_forks(&mut self) -> Result<()> {
        let mut queue = std::mem::take(&mut self.queue);
        for child in queue.iter_mut().filter(|r| !ready(r)) {
            let (Some(pid), Some(at)) = (child.parent_id, child.fork_step) else {
                continue;
            };
            let parent = self.store.run(pid).await.ok();
            let waiting = parent.as_ref().is_some_and(|p| {
                matches!(
                    p.status,
                    RunStatus::Running | RunStatus::Queued | RunStatus::Paused
                ) && p.step < at
            });
            if waiting {
                continue;
            }
            let forked = match &parent {
                Some(p) => isoflop::fork(p, child, at as u64).map_err(|e| engine::error_line(&e)),
                None => Err(format!("run {pid} was removed")),
            };
            if let Err(why) = forked {
                let why = format!(
                    "cannot fork from run {pid} at step {at} ({why}): trained from step 0 instead"
                );
                self.store.clear_fork(child.id, &why).await?;
                child.parent_id = None;
            }
        }
        self.queue = queue;
        Ok(())
    }

    /// A run with forks that paused at a fork point (its engine exited) and waits for this runner.
    async fn paused_parent(&self) -> Result<Option<RunRow>> {
        // Forks exist only in IsoFLOP studies: planned, without early stopping.
        let studies = self
            .sweeps
            .iter()
            .filter(|(_, s)| matches!(s.sampler, Sampler::Planned) && s.early.is_none());
        for (sweep, _) in studies {
            let runs = self.store.runs(Some(*sweep)).await?;
            let parent = runs.iter().find(|r| {
                r.status == RunStatus::Paused
                    && r.pid.is_none()
                    && r.slurm_job.is_none()
                    && !self.active.contains(&r.id)
                    && !self.tried.contains(&r.id)
                    && runs.iter().any(|c| c.parent_id == Some(r.id))
            });
            if let Some(p) = parent {
                return Ok(Some(p.clone()));
            }
        }
        Ok(None)
    }

    /// Launch a run that others fork from: first every fork whose point it has reached gets its
    /// checkpoint, then it trains on to the next fork point (a pause there), or to its end.
    async fn launch_parent(&mut self, parent: RunRow) -> Result<Next> {
        let children: Vec<RunRow> = self.children(&parent).await?.collect();
        let step = u64::try_from(parent.step).unwrap_or(0);
        let mut next_point: Option<u64> = None;
        for child in &children {
            let Some(at) = child.fork_step.and_then(|s| u64::try_from(s).ok()) else {
                continue;
            };
            if isoflop::forked(child) {
                continue;
            }
            if at > step {
                next_point = Some(next_point.map_or(at, |n| n.min(at)));
                continue;
            }
            // Its point is reached: the checkpoint there becomes the fork's start; gone (a run trained past
            // it outside the search), the fork trains from step 0 like any run.
            match isoflop::fork(&parent, child, at) {
                Ok(()) => {
                    self.store
                        .note(
                            child.id,
                            "runner",
                            &format!("forked from run {} at step {at}", parent.id),
                        )
                        .await?
                }
                Err(e) => {
                    let why = format!(
                        "cannot fork from run {} at step {at} ({}): trained from step 0 instead",
                        parent.id,
                        engine::error_line(&e)
                    );
                    self.store.clear_fork(child.id, &why).await?;
                }
            }
        }
        if parent.config.is_empty() {
            return Ok(self.launch(parent, false));
        }
        Ok(Next::Launch {
            pause: next_point.map(|s| Pause {
                rung: 0,
                at: PauseAt {
                    unit: engine::train::budget::BudgetUnit::Steps,
                    value: s as f64,
                },
            }),
            promoted: false,
            run: parent,
        })
    }

    /// `run` with where it pauses, or refused when its config cannot be read.
    fn launch(&mut self, run: RunRow, promoted: bool) -> Next {
        match self.pause_for(&run) {
            Ok(pause) => Next::Launch {
                run,
                pause,
                promoted,
            },
            Err(e) => Next::Refuse {
                reason: format!("{e:#}"),
                run,
            },
        }
    }

    /// Started.
    pub fn launched(&mut self, run: i64) {
        self.active.insert(run);
    }

    /// No room for `run` now (devices another runner holds): a queued run goes back to the front, a
    /// promotion is asked for again (it is still paused in the store).
    pub fn busy(&mut self, run: RunRow, promoted: bool) {
        self.due = true;
        if !promoted {
            self.queue.push_front(run);
        }
    }

    /// Another runner claimed `run` first (or it changed since it was read): not offered again until
    /// something happens.
    pub fn taken(&mut self, run: i64) {
        self.due = true;
        self.tried.insert(run);
    }

    /// A launch failed or was refused.
    pub fn failed(&mut self) {
        self.due = true;
    }

    /// A run's engine ended (its status is recorded by the caller).
    pub fn ended(&mut self, run: i64) {
        self.active.remove(&run);
        self.tried.clear();
        self.due = true;
    }

    /// Record what a run's event means for its search: a `paused` event is its result at the rung its
    /// claim sent it to; a `done` one moves its rung column past the last rung (a full length is not the
    /// same budget across configurations, so it is not compared).
    pub async fn observe(&mut self, run: i64, ev: &Event) -> Result<()> {
        if !matches!(ev, Event::Paused { .. } | Event::Done { .. }) {
            return Ok(());
        }
        let row = self.store.run(run).await?;
        let Some(es) = self.early_of(row.sweep_id).cloned() else {
            return Ok(());
        };
        let Ok(rungs) = self.config(&row).and_then(|cfg| es.rungs_of(cfg)) else {
            return Ok(());
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
                // The rung of its claim; a run launched by an older runner (no rung recorded) by its budget.
                let rung = match row.pause_rung {
                    Some(r) => r as usize,
                    None => rungs
                        .iter()
                        .rposition(|&b| b <= used * (1.0 + 1e-9))
                        .unwrap_or(0),
                };
                let value = match es.metric {
                    Metric::ValLoss => *val_loss,
                    Metric::ValBpb => *val_bpb,
                };
                self.store
                    .record_rung(run, row.sweep_id, rung, (used, value), true)
                    .await
            }
            _ => self.store.set_rung(run, rungs.len()).await,
        }
    }

    /// The search is over for this runner (`stopped`: by a signal or a launch that stops all): it leaves
    /// its sweeps; in each it was the last to leave, with nothing left to launch here and no run queued or
    /// running anywhere, every run still paused can never be promoted and becomes `pruned`.
    pub async fn finish(&mut self, stopped: bool, display: &mut Display) -> Result<usize> {
        let mut pruned = 0;
        let mut ids: Vec<i64> = self.sweeps.keys().copied().collect();
        ids.sort_unstable();
        for sweep in ids {
            let last = self.store.leave_sweep(sweep).await?;
            let Some(es) = self.early_of(sweep).cloned() else {
                continue;
            };
            if stopped || !last || self.queue.iter().any(|r| r.sweep_id == sweep) {
                continue;
            }
            // A run still queued (a trial a killed runner made) or running (an engine a killed runner
            // left) may yet change the rule's answer: the search is not over, `runner resume` goes on.
            let runs = self.store.runs(Some(sweep)).await?;
            if runs
                .iter()
                .any(|r| matches!(r.status, RunStatus::Queued | RunStatus::Running))
            {
                continue;
            }
            for r in runs {
                if r.status != RunStatus::Paused {
                    continue;
                }
                let rung = r.rung.unwrap_or(0);
                let at = self
                    .config(&r)
                    .ok()
                    .and_then(|cfg| es.rungs_of(cfg).ok())
                    .and_then(|rungs| rungs.get(rung as usize).copied())
                    .map_or(String::new(), |b| format!(" at {b} {}", es.budget.as_str()));
                let why = format!(
                    "{}: not promoted past rung {rung}{at}; checkpoint kept, `runner resume {}` trains it to full length",
                    es.describe(),
                    r.id
                );
                self.store.set_status(r.id, RunStatus::Pruned, &why).await?;
                display.line(format!("run {}: pruned ({why})", r.id));
                pruned += 1;
            }
        }
        // Sweeps of runs resumed on their own.
        for r in &self.queue {
            if !self.sweeps.contains_key(&r.sweep_id) {
                self.store.leave_sweep(r.sweep_id).await?;
            }
        }
        Ok(pruned)
    }

    /// Runs left in the queue (not launched).
    pub fn left_queued(&self) -> usize {
        self.queue.len()
    }

    /// The searching sweeps' ids (with early stopping).
    pub fn searching(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .sweeps
            .iter()
            .filter(|(_, s)| s.early.is_some())
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    fn early_of(&self, sweep: i64) -> Option<&EarlyStop> {
        self.sweeps.get(&sweep)?.early.as_ref()
    }

    /// The run's config, decoded once.
    fn config(&mut self, run: &RunRow) -> Result<&TrainConfig> {
        if let std::collections::hash_map::Entry::Vacant(slot) = self.configs.entry(run.id) {
            let table: toml::Table = run.config.parse().map_err(|e: toml::de::Error| {
                anyhow::anyhow!(
                    "run {}'s stored config does not parse ({}): remove the run (`runner rm {}`) and sweep again",
                    run.id,
                    crate::spec::one_line(&e.to_string()),
                    run.id
                )
            })?;
            slot.insert(TrainConfig::from_table(&table)?);
        }
        Ok(&self.configs[&run.id])
    }

    /// Where `run` pauses next: its next rung (its rung column + 1), or `None` for its end (also without
    /// early stopping).
    fn pause_for(&mut self, run: &RunRow) -> Result<Option<Pause>> {
        let Some(es) = self.early_of(run.sweep_id).cloned() else {
            return Ok(None);
        };
        if run.config.is_empty() {
            anyhow::bail!(
                "{}",
                run.error
                    .clone()
                    .unwrap_or_else(|| "its values were refused when it was planned".into())
            );
        }
        es.pause_at(self.config(run)?, run.rung)
    }

    /// The paused run the rule promotes next, over every searching sweep: only runs whose engine has
    /// exited (`pid` cleared) and that no claim of ours just failed on. `idle`: nothing runs here or waits
    /// to start; when the sweep would then end (no run of it running or queued anywhere, no trial left to
    /// sample) and none of its runs completed, its best run at the highest rung reached continues (with
    /// fewer than eta runs at a rung, the rule alone would keep none of them). Two idle runners may both
    /// pick it: the claim lets one launch it.
    async fn promotion(&mut self, idle: bool) -> Result<Option<RunRow>> {
        for sweep in self.searching() {
            let es = self.early_of(sweep).cloned().expect("searching");
            let results = self.store.rung_results(sweep).await?;
            let runs = self.store.runs(Some(sweep)).await?;
            let paused: Vec<(i64, usize)> = runs
                .iter()
                .filter(|r| r.status == RunStatus::Paused && r.pid.is_none())
                .filter(|r| r.slurm_job.is_none())
                .filter(|r| !self.active.contains(&r.id) && !self.tried.contains(&r.id))
                .filter_map(|r| Some((r.id, r.rung? as usize)))
                .collect();
            let mut id = next_promotion(es.method, es.reduction_factor, &results, &paused);
            let end = idle
                && !self.trials_left(sweep, runs.len())
                && !runs
                    .iter()
                    .any(|r| matches!(r.status, RunStatus::Running | RunStatus::Queued));
            if id.is_none() && end && !runs.iter().any(|r| r.status == RunStatus::Completed) {
                id = best_waiting(&results, &paused);
            }
            if let Some(id) = id {
                return Ok(runs.into_iter().find(|r| r.id == id));
            }
        }
        Ok(None)
    }

    /// Whether `sweep` samples trials and has fewer than its budget (`made` so far).
    fn trials_left(&self, sweep: i64, made: usize) -> bool {
        matches!(self.sweeps.get(&sweep).map(|s| &s.sampler), Some(Sampler::Tpe { sweep, .. }) if made < sweep.trials)
    }

    /// A new trial of a sampling sweep, recorded `queued` (with the sampler that chose it), while its
    /// budget lasts: the point TPE suggests from the trials so far — completed ones by their final
    /// metric, paused and pruned ones by their last rung's, running ones as pending. A point the engine
    /// would refuse (a dim n_heads does not divide) is recorded with its values and refused.
    async fn new_trial(&mut self) -> Result<Option<Next>> {
        let mut ids: Vec<i64> = self.sweeps.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let search = &self.sweeps[&id];
            let Sampler::Tpe { sweep, ranks } = &search.sampler else {
                continue;
            };
            let metric = search.early.as_ref().map(|e| e.metric);
            let mut refused = None;
            let made = self
                .store
                .add_trial(
                    id,
                    sweep.trials,
                    sweep.spec.resources.runs_dir.as_deref(),
                    |trial, runs, results| {
                        let (history, pending) = tpe::history(runs, results, metric);
                        let point =
                            tpe::suggest(&sweep.space, &history, &pending, sweep.seed, trial);
                        let sampler = if history.len() < tpe::STARTUP_TRIALS {
                            "random"
                        } else {
                            "tpe"
                        };
                        match crate::spec::plan_config(
                            &sweep.spec,
                            &sweep.file,
                            sweep.vocab,
                            &point,
                        ) {
                            Ok(cfg) => NewRun::planned(point, &cfg, sweep.vocab, *ranks, sampler),
                            Err(e) => {
                                refused = Some(engine::error_line(&e));
                                Ok(NewRun::refused(point, sampler))
                            }
                        }
                    },
                )
                .await?;
            let Some(run) = made else {
                continue;
            };
            return Ok(Some(match refused {
                Some(reason) => Next::Refuse {
                    run,
                    reason: format!("trial refused by the engine: {reason}"),
                },
                None => self.launch(run, false),
            }));
        }
        Ok(None)
    }

    /// A run that recorded its result at a rung and then ended `interrupted` or `failed` (its engine's
    /// teardown, its job's end) without going past that rung: it is paused there, waiting for the rule —
    /// resuming it towards its next rung would skip the decision.
    async fn still_at_rung(&self, run: &RunRow) -> Result<bool> {
        let (Some(es), Some(rung)) = (self.early_of(run.sweep_id), run.rung) else {
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
}
