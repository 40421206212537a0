//! The Slurm backend: each run becomes one `sbatch` job whose script `srun`s one engine rank per GPU (or
//! per CPU process). The runner stays on the submitting host as the only DB writer: it polls job states
//! (`squeue`, then `scontrol` once a job has left the queue), follows each run's `metrics.jsonl` on the
//! shared filesystem, and resubmits preempted, timed-out or cancelled jobs with `--resume`.

use std::collections::HashMap;
use std::io::{IsTerminal, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use engine::events::{Event, EXIT_INTERRUPTED};
use tokio::process::Command;
use tokio::sync::mpsc;

use super::{prepare_run_dir, EngineCommand, Executor, Interrupt, Launch, Update};
use crate::display::Display;
use crate::ingest::{self, Msg};
use crate::spec::{Devices, Resources};
use crate::store::{RunRow, RunStatus, RunStore};
use engine::train::budget::PauseAt;

/// Where a job stands, from its Slurm state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for resources (PENDING, CONFIGURING, REQUEUED…): the run is `queued`.
    Pending,
    /// Started (RUNNING, COMPLETING, SUSPENDED…): the run is `running`; its processes may still be live.
    Running,
    /// COMPLETED: the engine exited 0.
    Completed,
    /// Ended early through no fault of the run (preempted, timed out, cancelled, node failure): resume it.
    Stopped(String),
    /// FAILED, OUT_OF_MEMORY and the like.
    Failed(String),
}

/// Map a Slurm job state (as `squeue -o %T` or `scontrol`'s `JobState` print it) to a [`Phase`].
pub fn phase_of(state: &str) -> Phase {
    let s = state.split_whitespace().next().unwrap_or("");
    match s {
        "PENDING" | "CONFIGURING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED"
        | "RESV_DEL_HOLD" => Phase::Pending,
        "RUNNING" | "COMPLETING" | "SUSPENDED" | "STOPPED" | "SIGNALING" | "STAGE_OUT"
        | "RESIZING" | "UPDATE_DB" | "POWER_UP_NODE" => Phase::Running,
        "COMPLETED" => Phase::Completed,
        "PREEMPTED" | "TIMEOUT" | "CANCELLED" | "NODE_FAIL" | "BOOT_FAIL" | "DEADLINE" => {
            Phase::Stopped(s.to_string())
        }
        other => Phase::Failed(other.to_string()),
    }
}

/// A job's details from `scontrol show job ID -o`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobInfo {
    pub state: String,
    pub reason: String,
    /// The batch script's exit status (`ExitCode=STATUS:SIGNAL`).
    pub exit_code: Option<i32>,
    pub node: Option<String>,
}

/// Parse one line of `scontrol show job ID -o`.
pub fn parse_scontrol(line: &str) -> Option<JobInfo> {
    let mut info = JobInfo::default();
    for field in line.split_whitespace() {
        let Some((k, v)) = field.split_once('=') else {
            continue;
        };
        match k {
            "JobState" => info.state = v.to_string(),
            "Reason" => info.reason = v.to_string(),
            "ExitCode" => info.exit_code = v.split(':').next().and_then(|c| c.parse().ok()),
            "BatchHost" => info.node = Some(v.to_string()),
            _ => {}
        }
    }
    (!info.state.is_empty()).then_some(info)
}

pub(crate) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// CPU or GPU jobs: `devices = ["cpu"]` is CPU; a list of cuda devices is GPU; `"auto"` asks `sinfo`
/// whether the cluster has GPUs (generic resources named gpu).
pub async fn uses_gpus(res: &Resources) -> bool {
    match &res.devices {
        Devices::List(l) => !l.iter().all(|d| d == "cpu"),
        Devices::Auto(_) => {
            let mut cmd = Command::new("sinfo");
            cmd.args(["-h", "-o", "%G"]);
            if let Some(p) = &res.partition {
                cmd.args(["-p", p]);
            }
            match cmd.output().await {
                Ok(out) => String::from_utf8_lossy(&out.stdout).contains("gpu"),
                Err(_) => false,
            }
        }
    }
}

/// The batch script of one submission of `run`.
pub fn job_script(
    run: &RunRow,
    res: &Resources,
    engine: &EngineCommand,
    gpus: bool,
    pause_at: Option<PauseAt>,
) -> String {
    let dir = &run.run_dir;
    let nodes = res.nodes_per_run;
    let ranks = if gpus {
        res.gpus_per_run
    } else {
        res.procs_per_run
    };
    let mut s = String::from("#!/bin/bash\n");
    let mut opt = |o: String| s.push_str(&format!("#SBATCH {o}\n"));
    opt(format!("--job-name=bitllama-{}", run.id));
    opt(format!("--output={dir}/slurm-%j.out"));
    opt("--open-mode=append".into());
    opt(format!("--nodes={nodes}"));
    opt(format!("--ntasks-per-node={}", ranks / nodes));
    if gpus {
        opt(format!("--gres=gpu:{}", ranks / nodes));
    }
    if let Some(c) = res.cpus_per_task {
        opt(format!("--cpus-per-task={c}"));
    }
    if let Some(p) = &res.partition {
        opt(format!("--partition={p}"));
    }
    if let Some(a) = &res.account {
        opt(format!("--account={a}"));
    }
    if let Some(t) = &res.time_limit {
        opt(format!("--time={t}"));
    }
    for a in &res.sbatch_args {
        opt(a.clone());
    }
    let q = sh_quote(dir);
    let device = if gpus { "cuda" } else { "cpu" };
    let command = super::TrainCommand {
        engine,
        run_dir: Path::new(dir),
        device,
        pause_at,
    }
    .shell("srun --kill-on-bad-exit=1");
    s.push_str(&format!(
        r#"# Written by `runner` for run {id}; resubmitted as is after a preemption or timeout.
set -eu
cd {q}
# Rendezvous of the ranks (the engine reads SLURM_PROCID, SLURM_STEP_NUM_TASKS and SLURM_LOCALID under srun).
# The port stays below Linux's ephemeral range (32768 and up), which outgoing connections draw from.
export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 12000))
export RAYON_NUM_THREADS="${{SLURM_CPUS_PER_TASK:-1}}"
{command}"#,
        id = run.id,
    ));
    s
}

async fn run_tool(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .output()
        .await
        .with_context(|| format!("{what}: could not start it (is Slurm's client on PATH?)"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `sbatch --parsable SCRIPT` → job id.
async fn submit(script: &Path) -> Result<String> {
    let out = run_tool(
        Command::new("sbatch").arg("--parsable").arg(script),
        "sbatch",
    )
    .await?;
    // `--parsable` prints "ID" or "ID;CLUSTER".
    let id = out.trim().split(';').next().unwrap_or("").to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit() || c == '_') {
        bail!("sbatch printed {:?}, not a job id", out.trim());
    }
    Ok(id)
}

/// States of `jobs` from one `squeue` call; jobs squeue no longer knows are absent.
async fn squeue_states(jobs: &[String]) -> Result<HashMap<String, String>> {
    if jobs.is_empty() {
        return Ok(HashMap::new());
    }
    let out = Command::new("squeue")
        .args(["-h", "-t", "all", "-o", "%i %T", "-j", &jobs.join(",")])
        .output()
        .await
        .context("squeue: could not start it (is Slurm's client on PATH?)")?;
    // squeue exits non-zero when every id has aged out ("Invalid job id specified"): treat as none known.
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (id, st) = l.trim().split_once(' ')?;
            Some((id.to_string(), st.trim().to_string()))
        })
        .collect())
}

/// A pending or running job whose script is this run's `job.sh` (found by its job name and script path,
/// so a run of the same id in another runner home does not match). An error when squeue cannot answer:
/// "no job" must not be assumed then.
async fn live_job_for(run: &RunRow) -> Result<Option<String>> {
    let out = run_tool(
        Command::new("squeue").args(["-h", "-n", &format!("bitllama-{}", run.id), "-o", "%i %o"]),
        "squeue",
    )
    .await?;
    let script = Path::new(&run.run_dir).join("job.sh");
    let script = std::fs::canonicalize(&script).unwrap_or(script);
    Ok(out.lines().find_map(|l| {
        let (id, command) = l.trim().split_once(' ')?;
        let command = Path::new(command.trim());
        let command = std::fs::canonicalize(command).unwrap_or_else(|_| command.to_path_buf());
        (command == script).then(|| id.to_string())
    }))
}

async fn scontrol_show(job: &str) -> Option<JobInfo> {
    let out = Command::new("scontrol")
        .args(["show", "job", job, "-o"])
        .output()
        .await
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_scontrol(String::from_utf8_lossy(&out.stdout).lines().next()?)
}

async fn scancel(jobs: &[String]) -> Result<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    run_tool(Command::new("scancel").args(jobs), "scancel").await?;
    Ok(())
}

/// Reads the protocol lines a run's engine appends to `metrics.jsonl`, from where it left off.
pub struct MetricsFollower {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl MetricsFollower {
    /// Follow from byte `offset` (0: the whole file; the ingestion upserts, so a replay is harmless).
    pub fn new(path: PathBuf, offset: u64) -> Self {
        Self {
            path,
            offset,
            partial: String::new(),
        }
    }

    /// Follow only what is appended from now on.
    pub fn from_end(path: PathBuf) -> Self {
        let offset = std::fs::metadata(&path).map_or(0, |m| m.len());
        Self::new(path, offset)
    }

    /// Complete new lines, parsed (lines that are not protocol events are skipped).
    pub fn poll(&mut self) -> Vec<Event> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        let len = f.metadata().map_or(0, |m| m.len());
        if len < self.offset {
            // Replaced by a shorter file: start over.
            self.offset = 0;
            self.partial.clear();
        }
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(self.offset)).is_err() || f.read_to_end(&mut buf).is_err() {
            return Vec::new();
        }
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let mut events = Vec::new();
        while let Some(nl) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=nl).collect();
            if let Some(ev) = Event::parse(line.trim_end()) {
                events.push(ev);
            }
        }
        events
    }
}

/// Last lines of a job's output file, for a failure reason.
fn output_tail(run_dir: &str, job: &str, lines: usize) -> String {
    let path = Path::new(run_dir).join(format!("slurm-{job}.out"));
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// One run's live job, as the runner follows it.
struct Job {
    run: RunRow,
    job: String,
    follower: MetricsFollower,
    running: bool,
    done_seen: bool,
    /// The engine paused at `pause_at` (an early-stopping rung) and exited 0.
    paused_seen: bool,
    pause_at: Option<PauseAt>,
    restarts: u32,
    cancelled_by_us: bool,
}

/// What to do with a job that left the queue.
#[derive(Debug, PartialEq)]
enum Verdict {
    Completed,
    Resubmit(String),
    Interrupted(String),
    Failed(String),
}

fn verdict(
    job: &str,
    info: Option<&JobInfo>,
    done_seen: bool,
    cancelled_by_us: bool,
    restarts: u32,
    max_restarts: u32,
    tail: &str,
) -> Verdict {
    let Some(info) = info else {
        return if done_seen {
            Verdict::Completed
        } else {
            Verdict::Interrupted(format!(
                "Slurm job {job} left no state (squeue and scontrol no longer know it); `runner resume` continues it"
            ))
        };
    };
    let phase = phase_of(&info.state);
    // An engine that checkpointed and exited on SIGTERM (exit 130) was stopped, not broken.
    let phase = match phase {
        Phase::Failed(s) if info.exit_code == Some(EXIT_INTERRUPTED) => Phase::Stopped(s),
        p => p,
    };
    match phase {
        Phase::Completed if done_seen => Verdict::Completed,
        Phase::Completed => Verdict::Failed(format!(
            "Slurm job {job} completed but the engine wrote no done event; output: {tail}"
        )),
        Phase::Stopped(s) if cancelled_by_us => Verdict::Interrupted(format!(
            "Slurm job {job} {s} by the runner; `runner resume` continues it"
        )),
        Phase::Stopped(s) if restarts < max_restarts => Verdict::Resubmit(s),
        Phase::Stopped(s) => Verdict::Interrupted(format!(
            "Slurm job {job} {s} after {restarts} restart(s) (max_restarts = {max_restarts}); `runner resume` continues it"
        )),
        Phase::Failed(s) => Verdict::Failed(format!(
            "Slurm job {job} {s} (exit code {}, reason {}); output: {tail}",
            info.exit_code.map_or("?".to_string(), |c| c.to_string()),
            info.reason
        )),
        Phase::Pending | Phase::Running => unreachable!("only called for ended jobs"),
    }
}

/// Whether Ctrl-C should cancel the jobs: asks on a terminal, yes otherwise.
async fn confirm_cancel(n: usize) -> bool {
    if !std::io::stdin().is_terminal() {
        return true;
    }
    eprint!(
        "cancel the {n} Slurm job(s) of this sweep (they checkpoint first)? [y/N] (N leaves them running; `runner resume` follows them again) "
    );
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).ok();
        matches!(line.trim(), "y" | "Y" | "yes")
    })
    .await
    .unwrap_or(false)
}

/// The nodes' memory is unknown here: `memory_gb` (per run) is the only limit applied.
pub fn memory_limit(res: &Resources) -> Option<(f64, String)> {
    res.memory_gb.map(|l| (l, format!("memory_gb = {l}")))
}

/// Runs as Slurm jobs: up to `max_parallel` submitted at a time, followed through `squeue`/`scontrol` and
/// their `metrics.jsonl`. Runs already in a live job whose runner is gone are adopted, not resubmitted.
pub struct Slurm {
    store: RunStore,
    res: Resources,
    engine: EngineCommand,
    writer: mpsc::UnboundedSender<Msg>,
    gpus: bool,
    active: HashMap<i64, Job>,
    ticker: tokio::time::Interval,
    /// Updates found outside a poll (a pause read back at adoption), handed out by the next one.
    pending: Vec<Update>,
}

impl Slurm {
    pub async fn new(
        store: &RunStore,
        res: &Resources,
        engine: EngineCommand,
        writer: mpsc::UnboundedSender<Msg>,
    ) -> Result<Self> {
        if let Err(e) = Command::new("sbatch").arg("--version").output().await {
            bail!("backend = \"slurm\" but sbatch cannot be started ({e}): run the runner on a Slurm login node, or use backend = \"local\"");
        }
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(res.poll_seconds));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(Self {
            store: store.clone(),
            res: res.clone(),
            engine,
            writer,
            gpus: uses_gpus(res).await,
            active: HashMap::new(),
            ticker,
            pending: Vec::new(),
        })
    }

    async fn cancel_all(&mut self, display: &mut Display) {
        let jobs: Vec<String> = self.active.values().map(|j| j.job.clone()).collect();
        display.line(format!(
            "cancelling {} Slurm job(s); their engines checkpoint first…",
            jobs.len()
        ));
        for j in self.active.values_mut() {
            j.cancelled_by_us = true;
        }
        if let Err(e) = scancel(&jobs).await {
            display.line(format!("{e:#}"));
        }
    }

    fn detach(&self, display: &mut Display) -> Interrupt {
        if !self.active.is_empty() {
            display.line(format!(
                "left {} Slurm job(s) running ({}); `runner resume` follows them again",
                self.active.len(),
                self.active
                    .values()
                    .map(|j| j.job.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Interrupt::Detach
    }
}

impl Executor for Slurm {
    async fn adopt(
        &mut self,
        runs: Vec<RunRow>,
        pause_of: &mut dyn FnMut(&RunRow) -> Option<PauseAt>,
        display: &mut Display,
    ) -> Result<Vec<RunRow>> {
        let store = &self.store;
        let mut queue = Vec::new();
        for mut run in runs {
            if run.slurm_job.as_deref() == Some("submitting") {
                // Claimed by a runner that was about to run sbatch. Still alive: it is that runner's. Gone:
                // it may have died before sbatch (no job) or after it but before recording the id (a live
                // job runs this run's script): adopt such a job rather than submit a second one.
                if let Some(p) = run.other_live_runner() {
                    display.line(format!(
                        "run {}: runner pid {p} is submitting it; skipping",
                        run.id
                    ));
                    continue;
                }
                let job = match live_job_for(&run).await {
                    Ok(job) => job,
                    Err(e) => {
                        display.line(format!(
                            "run {}: cannot tell whether its job was submitted ({e:#}); left for the next `runner resume`",
                            run.id
                        ));
                        continue;
                    }
                };
                store.set_slurm_job(run.id, job.as_deref(), false).await?;
                run.slurm_job = job;
            }
            let Some(job) = run.slurm_job.clone() else {
                queue.push(run);
                continue;
            };
            if let Some(p) = run.other_live_runner() {
                display.line(format!(
                    "run {}: Slurm job {job} is followed by runner pid {p}; skipping",
                    run.id
                ));
                continue;
            }
            if !store.adopt_slurm_job(run.id, &job, run.runner_pid).await? {
                continue;
            }
            display.line(format!("run {}: following Slurm job {job} again", run.id));
            // What the job wrote while no runner followed it: its final timeline's rows (upserts, no
            // repeated notes in the event log), then everything appended from here on.
            let metrics = Path::new(&run.run_dir).join("metrics.jsonl");
            let follower = MetricsFollower::from_end(metrics.clone());
            let starts = store.engine_starts(run.id).await?;
            let ended = ingest::backfill(&self.writer, run.id, &metrics, starts);
            let paused_seen = matches!(ended, Some(Event::Paused { .. }));
            let done_seen = ended.is_some();
            if let Some(ev @ Event::Paused { .. }) = ended {
                // Paused while nobody followed it: the rule still has to hear of it.
                self.pending.push(Update::Event(run.id, ev));
            }
            self.active.insert(
                run.id,
                Job {
                    running: run.status == RunStatus::Running,
                    restarts: run.restarts as u32,
                    job,
                    follower,
                    done_seen,
                    paused_seen,
                    // The rung it was sent to, kept across resubmissions.
                    pause_at: pause_of(&run),
                    cancelled_by_us: false,
                    run,
                },
            );
        }
        Ok(queue)
    }

    fn has_room(&self) -> bool {
        self.active.len() < self.res.cpu_parallel()
    }

    fn active(&self) -> usize {
        self.active.len()
    }

    fn memory_limit(&self) -> Option<(f64, String)> {
        memory_limit(&self.res)
    }

    async fn launch(&mut self, run: RunRow, pause: Option<crate::search::Pause>) -> Result<Launch> {
        let pause_at = pause.map(|p| p.at);
        if !self
            .store
            .claim_for_slurm(&run, pause.map(|p| p.rung))
            .await?
        {
            return Ok(Launch::Taken);
        }
        match submit_run(
            &self.store,
            &run,
            &self.res,
            &self.engine,
            self.gpus,
            pause_at,
        )
        .await
        {
            Ok(job) => {
                self.store.set_slurm_job(run.id, Some(&job), false).await?;
                let follower =
                    MetricsFollower::from_end(Path::new(&run.run_dir).join("metrics.jsonl"));
                let place = format!("Slurm job {job}");
                self.active.insert(
                    run.id,
                    Job {
                        run,
                        job,
                        follower,
                        running: false,
                        done_seen: false,
                        paused_seen: false,
                        pause_at,
                        restarts: 0,
                        cancelled_by_us: false,
                    },
                );
                Ok(Launch::Started(place))
            }
            // A bad partition, account or time limit fails every submission alike: stop here.
            Err(e) => Ok(Launch::Failed {
                reason: format!("{e:#}"),
                stop_all: true,
            }),
        }
    }

    async fn wait(&mut self) {
        if self.pending.is_empty() {
            self.ticker.tick().await;
        }
    }

    async fn updates(&mut self) -> Result<Vec<Update>> {
        let mut updates = std::mem::take(&mut self.pending);
        updates.extend(
            poll_jobs(
                &self.store,
                &self.res,
                &self.engine,
                self.gpus,
                &mut self.active,
            )
            .await?,
        );
        Ok(updates)
    }

    async fn interrupt(
        &mut self,
        second: bool,
        terminal: bool,
        display: &mut Display,
    ) -> Interrupt {
        if second {
            // A second Ctrl-C: leave whatever is still live to `runner resume`; a second SIGTERM is
            // already being acted on.
            return if terminal {
                self.detach(display)
            } else {
                Interrupt::Stopping
            };
        }
        if !terminal || confirm_cancel(self.active.len()).await {
            self.cancel_all(display).await;
            Interrupt::Stopping
        } else {
            self.detach(display)
        }
    }
}

async fn submit_run(
    store: &RunStore,
    run: &RunRow,
    res: &Resources,
    engine: &EngineCommand,
    gpus: bool,
    pause_at: Option<PauseAt>,
) -> Result<String> {
    prepare_run_dir(store, run).await?;
    let script = Path::new(&run.run_dir).join("job.sh");
    std::fs::write(&script, job_script(run, res, engine, gpus, pause_at))
        .with_context(|| format!("writing {}", script.display()))?;
    submit(&script).await
}

/// One poll: new metrics of every job, then the states of all jobs in one `squeue` call.
async fn poll_jobs(
    store: &RunStore,
    res: &Resources,
    engine: &EngineCommand,
    gpus: bool,
    active: &mut HashMap<i64, Job>,
) -> Result<Vec<Update>> {
    let mut updates = Vec::new();
    let ids: Vec<String> = active.values().map(|j| j.job.clone()).collect();
    let states = squeue_states(&ids).await?;
    let mut ended = Vec::new();
    for (run_id, j) in active.iter_mut() {
        // Read metrics after the state, so a job seen ended has had all its lines read.
        for ev in j.follower.poll() {
            match ev {
                Event::Done { .. } => j.done_seen = true,
                Event::Paused { .. } => (j.done_seen, j.paused_seen) = (true, true),
                _ => {}
            }
            updates.push(Update::Event(*run_id, ev));
        }
        let info = match states.get(&j.job) {
            Some(st) => Some(JobInfo {
                state: st.clone(),
                ..Default::default()
            }),
            None => scontrol_show(&j.job).await,
        };
        match info.as_ref().map(|i| phase_of(&i.state)) {
            Some(Phase::Pending) => {}
            Some(Phase::Running) => {
                if !j.running {
                    j.running = true;
                    updates.push(Update::Status(
                        *run_id,
                        RunStatus::Running,
                        format!("Slurm job {} running", j.job),
                    ));
                }
            }
            _ => ended.push(*run_id),
        }
    }
    for run_id in ended {
        let mut j = active.remove(&run_id).expect("listed above");
        // The final lines, and the exit code and reason.
        for ev in j.follower.poll() {
            match ev {
                Event::Done { .. } => j.done_seen = true,
                Event::Paused { .. } => (j.done_seen, j.paused_seen) = (true, true),
                _ => {}
            }
            updates.push(Update::Event(run_id, ev));
        }
        let info = scontrol_show(&j.job).await;
        let tail = output_tail(&j.run.run_dir, &j.job, 8);
        let v = verdict(
            &j.job,
            info.as_ref(),
            j.done_seen,
            j.cancelled_by_us,
            j.restarts,
            res.max_restarts,
            &tail,
        );
        let (status, why) = match v {
            Verdict::Resubmit(state) => {
                match submit_run(store, &j.run, res, engine, gpus, j.pause_at).await {
                    Ok(job) => {
                        updates.push(Update::Line(format!(
                        "run {run_id}: Slurm job {} {state}; resubmitted as job {job} (restart {}/{})",
                        j.job,
                        j.restarts + 1,
                        res.max_restarts
                    )));
                        store
                            .note(
                                run_id,
                                "slurm",
                                &format!(
                                    "Slurm job {} {state}: resuming from its checkpoint",
                                    j.job
                                ),
                            )
                            .await?;
                        store.set_slurm_job(run_id, Some(&job), true).await?;
                        updates.push(Update::Status(
                            run_id,
                            RunStatus::Queued,
                            format!("Slurm job {job} pending"),
                        ));
                        j.job = job;
                        j.restarts += 1;
                        j.running = false;
                        j.done_seen = false;
                        j.paused_seen = false;
                        active.insert(run_id, j);
                        continue;
                    }
                    Err(e) => (
                        RunStatus::Interrupted,
                        format!("Slurm job {} {state}; resubmitting failed: {e:#}", j.job),
                    ),
                }
            }
            Verdict::Completed if j.paused_seen => (
                RunStatus::Paused,
                format!(
                    "at {}: waiting for the search (the early-stopping rule, or forks to start from here)",
                    j.pause_at.map_or("its rung".to_string(), |p| p.to_string())
                ),
            ),
            Verdict::Completed => (RunStatus::Completed, String::new()),
            Verdict::Interrupted(why) => (RunStatus::Interrupted, why),
            Verdict::Failed(why) => (RunStatus::Failed, why),
        };
        updates.push(Update::Ended(run_id, status, why));
    }
    Ok(updates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slurm_states_map_to_phases() {
        assert_eq!(phase_of("PENDING"), Phase::Pending);
        assert_eq!(phase_of("COMPLETING"), Phase::Running);
        assert_eq!(phase_of("COMPLETED"), Phase::Completed);
        assert_eq!(phase_of("TIMEOUT"), Phase::Stopped("TIMEOUT".into()));
        assert_eq!(phase_of("PREEMPTED"), Phase::Stopped("PREEMPTED".into()));
        assert_eq!(phase_of("NODE_FAIL"), Phase::Stopped("NODE_FAIL".into()));
        assert_eq!(phase_of("FAILED"), Phase::Failed("FAILED".into()));
        assert_eq!(
            phase_of("OUT_OF_MEMORY"),
            Phase::Failed("OUT_OF_MEMORY".into())
        );
    }

    #[test]
    fn scontrol_lines_parse() {
        let line = "JobId=7 JobName=bitllama-3 UserId=root(0) JobState=CANCELLED Reason=None Dependency=(null) \
                    Requeue=1 ExitCode=130:0 BatchHost=node1 NumNodes=1";
        let info = parse_scontrol(line).unwrap();
        assert_eq!(info.state, "CANCELLED");
        assert_eq!(info.exit_code, Some(130));
        assert_eq!(info.node.as_deref(), Some("node1"));
        assert!(parse_scontrol("garbage").is_none());
    }

    #[test]
    fn verdicts_resubmit_until_the_limit() {
        let info = |state: &str, code: i32| JobInfo {
            state: state.into(),
            reason: "None".into(),
            exit_code: Some(code),
            node: None,
        };
        let v =
            |i: &JobInfo, done, ours, restarts| verdict("9", Some(i), done, ours, restarts, 3, "t");
        assert_eq!(v(&info("COMPLETED", 0), true, false, 0), Verdict::Completed);
        assert!(matches!(
            v(&info("COMPLETED", 0), false, false, 0),
            Verdict::Failed(_)
        ));
        assert_eq!(
            v(&info("TIMEOUT", 0), false, false, 2),
            Verdict::Resubmit("TIMEOUT".into())
        );
        assert!(matches!(
            v(&info("TIMEOUT", 0), false, false, 3),
            Verdict::Interrupted(_)
        ));
        assert!(matches!(
            v(&info("CANCELLED", 130), false, true, 0),
            Verdict::Interrupted(_)
        ));
        // An engine that exited 130 after a SIGTERM was stopped, not broken.
        assert_eq!(
            v(&info("FAILED", 130), false, false, 0),
            Verdict::Resubmit("FAILED".into())
        );
        let failed = v(&info("FAILED", 1), false, false, 0);
        assert!(
            matches!(&failed, Verdict::Failed(m) if m.contains("exit code 1")),
            "{failed:?}"
        );
        assert!(matches!(
            verdict("9", None, true, false, 0, 3, ""),
            Verdict::Completed
        ));
    }

    #[test]
    fn the_follower_reads_whole_lines_once() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("metrics.jsonl");
        let line = r#"{"event":"eval","step":5,"val_loss":2.5,"val_bpb":1.0}"#;
        std::fs::write(&p, format!("{line}\n{}", &line[..10])).unwrap();
        let mut f = MetricsFollower::new(p.clone(), 0);
        assert_eq!(f.poll().len(), 1);
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        write!(file, "{}\nnot json\n", &line[10..]).unwrap();
        assert_eq!(f.poll().len(), 1);
        assert!(f.poll().is_empty());
        assert!(MetricsFollower::from_end(p).poll().is_empty());
    }

    #[test]
    fn job_scripts_start_one_rank_per_gpu() {
        let run = RunRow {
            id: 4,
            sweep_id: 1,
            status: RunStatus::Queued,
            params: serde_json::Value::Null,
            config: String::new(),
            run_dir: "/shared/runs/run-4".into(),
            device: None,
            pid: None,
            step: 0,
            total_steps: None,
            tokens: 0,
            loss: None,
            val_loss: None,
            best_val_loss: None,
            val_bpb: None,
            tokens_per_s: None,
            wall_s: 0.0,
            checkpoint: None,
            param_count: None,
            mem_estimate: None,
            error: None,
            slurm_job: None,
            restarts: 0,
            runner_pid: None,
            runner_host: None,
            runner_started: None,
            rung: None,
            sampler: None,
            idx: 0,
            pause_rung: None,
            flops_per_token: None,
            params_non_embedding: None,
            budget: None,
            parent_id: None,
            fork_step: None,
        };
        let res = Resources {
            gpus_per_run: 8,
            nodes_per_run: 2,
            partition: Some("gpu".into()),
            time_limit: Some("01:00:00".into()),
            sbatch_args: vec!["--qos=high".into()],
            ..Resources::default()
        };
        let engine = EngineCommand {
            program: "/opt/bit llama/engine".into(),
            prefix: vec![],
        };
        let s = job_script(&run, &res, &engine, true, None);
        for needle in [
            "#SBATCH --nodes=2\n",
            "#SBATCH --ntasks-per-node=4\n",
            "#SBATCH --gres=gpu:4\n",
            "#SBATCH --partition=gpu\n",
            "#SBATCH --time=01:00:00\n",
            "#SBATCH --qos=high\n",
            "#SBATCH --output=/shared/runs/run-4/slurm-%j.out\n",
            "exec srun --kill-on-bad-exit=1 '/opt/bit llama/engine' train \"$@\" --set 'device=\"cuda\"'",
            "--resume '/shared/runs/run-4'",
        ] {
            assert!(s.contains(needle), "{needle} missing from\n{s}");
        }
        let cpu = job_script(
            &run,
            &Resources::default(),
            &engine,
            false,
            "tokens=512".parse().ok(),
        );
        assert!(cpu.contains("--pause-at tokens=512\n"), "{cpu}");
        assert!(!cpu.contains("--gres") && cpu.contains("device=\"cpu\""));
    }
}
