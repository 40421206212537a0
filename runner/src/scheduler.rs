//! The scheduler: hands free devices to queued runs, launches one `engine train` process per run, streams
//! its protocol into the writer task, and records how each process ended.

use std::collections::{HashMap, VecDeque};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use engine::events::{Event, EXIT_INTERRUPTED};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use crate::ingest::{self, Msg};
use crate::spec::{Backend, Devices, Resources};
use crate::store::{RunRow, RunStatus, RunStore};

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
                anyhow::bail!(
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

/// Free devices, handed out `per_run` at a time, to at most `max_runs` runs at once. With a lock dir
/// (GPUs), a device is also taken only under an exclusive lock on `DIR/HOST-DEVICE.lock`, held until the
/// run gives it back: runners sharing one home never put two runs on one GPU, and a runner that dies
/// releases its locks with it.
#[derive(Debug)]
pub struct DeviceSlots {
    free: Vec<String>,
    per_run: usize,
    max_runs: usize,
    running: usize,
    lock_dir: Option<PathBuf>,
    held: HashMap<String, std::fs::File>,
}

impl DeviceSlots {
    /// CPU: `max_parallel` (default 2) engine processes named `cpu`, `per_run` (= procs_per_run) to a run.
    /// GPUs: each device once, `per_run` (= gpus_per_run) to a run, and no more than `max_parallel` runs
    /// when it is set.
    pub fn new(devices: &[String], per_run: usize, max_parallel: Option<usize>) -> Self {
        let (free, max_runs) = if devices.iter().all(|d| d == "cpu") {
            let procs = max_parallel.unwrap_or(2).max(per_run);
            (vec!["cpu".to_string(); procs], usize::MAX)
        } else {
            let gpus = devices.iter().rev().cloned().collect();
            (gpus, max_parallel.unwrap_or(usize::MAX))
        };
        Self {
            free,
            per_run,
            max_runs,
            running: 0,
            lock_dir: None,
            held: HashMap::new(),
        }
    }

    /// Lock GPUs across processes through files in `dir` (created if missing).
    pub fn with_locks(mut self, dir: PathBuf) -> Self {
        if self.free.iter().any(|d| d != "cpu") {
            self.lock_dir = Some(dir);
        }
        self
    }

    /// `Err` when another process holds `device`.
    fn try_lock(&self, device: &str) -> std::result::Result<Option<std::fs::File>, ()> {
        let Some(dir) = &self.lock_dir else {
            return Ok(None);
        };
        let name = format!(
            "{}-{}.lock",
            crate::store::this_host(),
            device.replace(':', "-")
        );
        let file = std::fs::create_dir_all(dir)
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(dir.join(name))
            })
            // An unusable lock dir must not stop the sweep: fall back to this process's own accounting.
            .map_err(|e| tracing::warn!("device lock for {device}: {e}"));
        let Ok(file) = file else { return Ok(None) };
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => Err(()),
            // A filesystem without flock (some NFS/Lustre mounts): as an unusable lock dir above.
            Err(std::fs::TryLockError::Error(e)) => {
                tracing::warn!("device lock for {device}: {e}");
                Ok(None)
            }
        }
    }

    /// `per_run` devices for one run, or `None` when too few are free (here, or, with locks, in other
    /// runners).
    pub fn take(&mut self) -> Option<Vec<String>> {
        if !self.capacity_for_one() {
            return None;
        }
        let mut picked: Vec<(usize, Option<std::fs::File>)> = Vec::new();
        for i in (0..self.free.len()).rev() {
            if picked.len() == self.per_run {
                break;
            }
            if let Ok(lock) = self.try_lock(&self.free[i]) {
                picked.push((i, lock));
            }
        }
        if picked.len() < self.per_run {
            return None; // the locks taken so far drop here
        }
        self.running += 1;
        // Indices are in descending order, so each removal leaves the next index valid.
        let mut devices = Vec::with_capacity(self.per_run);
        for (i, lock) in picked {
            let d = self.free.remove(i);
            if let Some(lock) = lock {
                self.held.insert(d.clone(), lock);
            }
            devices.push(d);
        }
        Some(devices)
    }

    pub fn give(&mut self, devices: Vec<String>) {
        self.running = self.running.saturating_sub(1);
        for d in &devices {
            self.held.remove(d);
        }
        self.free.extend(devices);
    }

    pub fn capacity_for_one(&self) -> bool {
        self.free.len() >= self.per_run && self.running < self.max_runs
    }
}

/// GPUs `nvidia-smi` reports, as `cuda:N`; empty without it.
fn detect_gpus() -> Vec<(String, Option<f64>)> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=index,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .output();
    let Ok(out) = out else { return Vec::new() };
    if !out.status.success() {
        return Vec::new();
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut parts = l.split(',').map(str::trim);
            let idx = parts.next()?.parse::<usize>().ok()?;
            let mib = parts.next().and_then(|m| m.parse::<f64>().ok());
            Some((format!("cuda:{idx}"), mib.map(|m| m / 1024.0)))
        })
        .collect()
}

fn ram_gib() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: f64 = text
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / (1024.0 * 1024.0))
}

/// The devices of `[resources]` and the memory (GiB) one run may use on them.
pub fn resolve_devices(res: &Resources) -> (Vec<String>, Option<f64>) {
    let (devices, gpu_mem) = match &res.devices {
        Devices::List(list) => (list.clone(), None),
        Devices::Auto(_) => {
            let gpus = detect_gpus();
            if gpus.is_empty() {
                (vec!["cpu".to_string()], None)
            } else {
                let mem = gpus.iter().filter_map(|g| g.1).reduce(f64::min);
                (gpus.into_iter().map(|g| g.0).collect(), mem)
            }
        }
    };
    let limit = res.memory_gb.or(if devices.iter().all(|d| d == "cpu") {
        ram_gib().map(|r| r / res.cpu_parallel() as f64)
    } else {
        gpu_mem
    });
    (devices, limit)
}

/// Live view of the active runs: indicatif on a terminal, plain lines otherwise.
pub(crate) struct Display {
    multi: Option<MultiProgress>,
    pub(crate) overall: ProgressBar,
    bars: HashMap<i64, ProgressBar>,
    last_line: HashMap<i64, Instant>,
}

impl Display {
    pub(crate) fn new(total: usize) -> Self {
        let tty = std::io::stderr().is_terminal();
        let multi = tty.then(MultiProgress::new);
        let overall = match &multi {
            Some(m) => {
                let b = m.add(ProgressBar::new(total as u64));
                b.set_style(
                    ProgressStyle::with_template(
                        "runs {pos}/{len} [{elapsed_precise}] {bar:30} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                b
            }
            None => ProgressBar::hidden(),
        };
        Self {
            multi,
            overall,
            bars: HashMap::new(),
            last_line: HashMap::new(),
        }
    }

    pub(crate) fn line(&self, text: String) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(text);
            }
            None => eprintln!("{text}"),
        }
    }

    pub(crate) fn started(&mut self, run: i64, device: &str) {
        if let Some(m) = &self.multi {
            let b = m.add(ProgressBar::new(0));
            b.set_style(
                ProgressStyle::with_template(
                    "  run {prefix:>4} {pos:>6}/{len:6} {bar:20} {msg} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_prefix(run.to_string());
            self.bars.insert(run, b);
        }
        self.line(format!("run {run}: launched on {device}"));
    }

    pub(crate) fn event(&mut self, run: i64, ev: &Event) {
        let bar = self.bars.get(&run);
        match ev {
            Event::Start {
                step, total_steps, ..
            } => {
                if let Some(b) = bar {
                    b.set_length(total_steps.unwrap_or(0));
                    b.set_position(*step);
                    b.reset_eta();
                }
            }
            Event::Step {
                step,
                loss,
                tokens_per_s,
                ..
            } => {
                if let Some(b) = bar {
                    b.set_position(*step);
                    b.set_message(format!("loss {loss:.3} {tokens_per_s:.0} tok/s"));
                } else {
                    let due = self
                        .last_line
                        .get(&run)
                        .is_none_or(|t| t.elapsed() > Duration::from_secs(10));
                    if due {
                        self.last_line.insert(run, Instant::now());
                        self.line(format!(
                            "run {run}: step {step} loss {loss:.4} {tokens_per_s:.0} tok/s"
                        ));
                    }
                }
            }
            Event::Eval {
                step,
                val_loss,
                val_bpb,
            } => self.line(format!(
                "run {run}: step {step} val loss {val_loss:.4} ({val_bpb:.3} bpb)"
            )),
            _ => {}
        }
    }

    pub(crate) fn finished(&mut self, run: i64, status: RunStatus, reason: &str) {
        if let Some(b) = self.bars.remove(&run) {
            b.finish_and_clear();
            if let Some(m) = &self.multi {
                m.remove(&b);
            }
        }
        self.overall.inc(1);
        self.line(format!("run {run}: {} {reason}", status.as_str()));
    }
}

/// How one engine process ended.
struct Ended {
    run: i64,
    devices: Vec<String>,
    status: RunStatus,
    reason: String,
}

/// Last lines of a process's stderr, kept for the failure reason.
const STDERR_TAIL: usize = 20;

/// What every launch shares: how to start engines, where events go, which pids are live.
#[derive(Clone)]
struct LaunchContext {
    engine: EngineCommand,
    store: RunStore,
    writer: mpsc::UnboundedSender<Msg>,
    ui: mpsc::UnboundedSender<(i64, Event)>,
    pids: Arc<Mutex<HashMap<i64, Vec<u32>>>>,
    threads_per_run: usize,
}

/// Launch one run's engine and follow it to the end.
async fn launch(run: RunRow, devices: Vec<String>, ctx: LaunchContext) -> Ended {
    let LaunchContext {
        engine,
        store,
        writer,
        ui,
        pids,
        threads_per_run,
    } = ctx;
    let id = run.id;
    let result = async {
        let run_dir = PathBuf::from(&run.run_dir);
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        // A runner killed outright may not have committed the engine's last lines: take the metrics and
        // checkpoints the engine already wrote to its run dir again (upserts, so nothing doubles).
        ingest::backfill(&writer, id, &run_dir.join("metrics.jsonl"));
        let gpus: Vec<&str> = devices
            .iter()
            .filter_map(|d| d.strip_prefix("cuda:"))
            .collect();
        // One rank per GPU, or `procs_per_run` CPU ranks (one per CPU slot handed to this run).
        let world = devices.len().max(1);
        let device = if gpus.is_empty() { "cpu" } else { "cuda:0" };
        let mut args: Vec<std::ffi::OsString> = engine.prefix.iter().map(Into::into).collect();
        args.push("train".into());
        if run_dir.join("config.toml").is_file() {
            args.extend(["--resume".into(), run_dir.clone().into_os_string()]);
        } else {
            if run.step > 0 {
                // The engine's start event at step 0 then clears the old metrics and checkpoint rows.
                let why = format!(
                    "run dir {} is gone (it had reached step {}): starting the run over from step 0",
                    run_dir.display(),
                    run.step
                );
                store.note(id, "runner", &why).await?;
                tracing::warn!("run {id}: {why}");
            }
            let cfg = run_dir.join("run.toml");
            std::fs::write(&cfg, &run.config)
                .with_context(|| format!("writing {}", cfg.display()))?;
            args.extend([
                "--config".into(),
                cfg.into_os_string(),
                "--out".into(),
                run_dir.clone().into_os_string(),
            ]);
        }
        args.extend(["--set".into(), format!("device=\"{device}\"").into()]);
        let port = if world > 1 { free_port()? } else { 0 };
        let mut children = Vec::with_capacity(world);
        for rank in 0..world {
            let mut cmd = tokio::process::Command::new(&engine.program);
            cmd.args(&args);
            // Always set: a runner started inside a Slurm step or torchrun must not pass its own rank on.
            cmd.env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", rank.to_string());
            if world > 1 {
                cmd.env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", port.to_string());
            }
            if !gpus.is_empty() {
                cmd.env("CUDA_VISIBLE_DEVICES", gpus[rank]);
            } else if std::env::var_os("RAYON_NUM_THREADS").is_none() {
                // Runs sharing the CPU split its cores instead of oversubscribing them.
                cmd.env("RAYON_NUM_THREADS", threads_per_run.to_string());
            }
            // Own process group: a terminal's Ctrl-C reaches the runner only, which forwards one SIGTERM.
            cmd.process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(false);
            match cmd.spawn() {
                Ok(child) => children.push(child),
                Err(e) => {
                    // Ranks already started would wait for this one until their timeout: stop them now.
                    terminate(&children.iter().filter_map(|c| c.id()).collect::<Vec<_>>());
                    return Err(e).with_context(|| format!("starting {}", engine.program.display()));
                }
            }
        }
        let rank_pids: Vec<u32> = children.iter().map(|c| c.id().unwrap_or(0)).collect();
        pids.lock()
            .expect("pids lock")
            .insert(id, rank_pids.clone());
        if let Err(e) = store.set_pid(id, rank_pids[0]).await {
            terminate(&rank_pids);
            pids.lock().expect("pids lock").remove(&id);
            return Err(e);
        }

        // Every rank: stderr to RUN_DIR/engine.log (rank 0) or rank-N.log, keeping a tail for the reason;
        // ranks > 0 also log their stdout there. Rank 0's stdout is the protocol stream.
        let mut waiters = tokio::task::JoinSet::new();
        let mut rank0_stdout = None;
        for (rank, mut child) in children.into_iter().enumerate() {
            let log_name = if rank == 0 {
                "engine.log".to_string()
            } else {
                format!("rank-{rank}.log")
            };
            let log_path = run_dir.join(log_name);
            let stderr = child.stderr.take().expect("piped stderr");
            let stdout = child.stdout.take().expect("piped stdout");
            if rank == 0 {
                rank0_stdout = Some(stdout);
            } else {
                let out_log = run_dir.join(format!("rank-{rank}.stdout"));
                tokio::spawn(async move {
                    let mut f = std::fs::File::create(out_log).ok();
                    let mut lines = BufReader::new(stdout).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if let Some(f) = &mut f {
                            use std::io::Write;
                            let _ = writeln!(f, "{line}");
                        }
                    }
                });
            }
            waiters.spawn(async move {
                let tail = tail_to_log(stderr, log_path).await;
                let status = child.wait().await;
                (rank, status, tail)
            });
        }
        let (mut done, mut interrupted, mut error) = (false, false, None::<String>);
        let mut lines = BufReader::new(rank0_stdout.expect("rank 0")).lines();
        loop {
            let line = match lines.next_line().await {
                Ok(Some(line)) => line,
                Ok(None) => break,
                // A line that is not UTF-8 is consumed and skipped; the stream goes on.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => continue,
                Err(e) => {
                    // Stop reading but still wait for (and account for) every rank below.
                    error.get_or_insert(format!("reading the engine's output: {e}"));
                    break;
                }
            };
            let Some(ev) = Event::parse(&line) else {
                continue;
            };
            match &ev {
                Event::Done { .. } => done = true,
                Event::Interrupted { .. } => interrupted = true,
                Event::Error { message } => error = Some(message.clone()),
                _ => {}
            }
            let _ = ui.send((id, ev.clone()));
            let _ = writer.send(Msg::Event(id, ev));
        }
        // Wait for every rank; the first to fail stops the rest (SIGTERM: they checkpoint or exit).
        let mut failure: Option<(usize, std::process::ExitStatus, Vec<String>)> = None;
        let mut all_ok = true;
        let mut any_interrupted = false;
        let mut ended = vec![false; rank_pids.len()];
        let mut kill_at: Option<tokio::time::Instant> = None;
        loop {
            let next = match kill_at {
                None => waiters.join_next().await,
                Some(at) => match tokio::time::timeout_at(at, waiters.join_next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        // A rank that neither stopped nor died (hung in a kernel call, or spinning):
                        // not reaped yet, so its pid is still its own.
                        for (pid, _) in rank_pids.iter().zip(&ended).filter(|(p, e)| **p > 0 && !**e) {
                            send(*pid, libc::SIGKILL);
                        }
                        kill_at = None;
                        continue;
                    }
                },
            };
            let Some(joined) = next else { break };
            let (rank, status, tail) = joined.context("a rank waiter panicked")?;
            if let Some(e) = ended.get_mut(rank) {
                *e = true;
            }
            let status = status?;
            match status.code() {
                Some(0) => {}
                Some(EXIT_INTERRUPTED) => any_interrupted = true,
                _ => {
                    all_ok = false;
                    if failure.is_none() {
                        failure = Some((rank, status, tail.into_iter().collect()));
                        terminate(&rank_pids);
                        kill_at = Some(tokio::time::Instant::now() + RANK_STOP_GRACE);
                    }
                }
            }
        }
        pids.lock().expect("pids lock").remove(&id);
        Ok::<_, anyhow::Error>(if done && all_ok {
            (RunStatus::Completed, String::new())
        } else if failure.is_none() && (interrupted || any_interrupted) {
            (
                RunStatus::Interrupted,
                "stopped by a signal; `runner resume` continues it".to_string(),
            )
        } else {
            // The failed rank's stderr tail, less the line that repeats the error event.
            let rank_failure = |(rank, status, tail): (usize, std::process::ExitStatus, Vec<String>),
                                error: Option<&str>| {
                let tail: Vec<String> = tail
                    .into_iter()
                    .filter(|l| error.is_none_or(|e| l.trim() != format!("error: {e}")))
                    .collect();
                if tail.is_empty() {
                    format!("rank {rank} exited with {status}")
                } else {
                    format!(
                        "rank {rank} exited with {status}; stderr tail: {}",
                        tail.join(" | ")
                    )
                }
            };
            let why = match (error, failure) {
                (Some(e), Some(f)) => {
                    let f = rank_failure(f, Some(&e));
                    format!("{e} ({f})")
                }
                (Some(e), None) => e,
                (None, Some(f)) => rank_failure(f, None),
                (None, None) => "the engine ended without a done event".to_string(),
            };
            (RunStatus::Failed, why)
        })
    }
    .await;
    let (status, reason) = result.unwrap_or_else(|e| (RunStatus::Failed, format!("{e:#}")));
    Ended {
        run: id,
        devices,
        status,
        reason,
    }
}

/// Copy a process's stderr to `log_path`, returning its last lines.
async fn tail_to_log(stderr: tokio::process::ChildStderr, log_path: PathBuf) -> VecDeque<String> {
    let mut tail = VecDeque::with_capacity(STDERR_TAIL);
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .ok();
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(f) = &mut log {
            use std::io::Write;
            let _ = writeln!(f, "{line}");
        }
        if tail.len() == STDERR_TAIL {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    tail
}

/// A TCP port free right now, for a run's rendezvous.
fn free_port() -> Result<u16> {
    Ok(engine::dist::pick_free_port()?)
}

/// Counts of how runs ended.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub completed: usize,
    pub failed: usize,
    pub interrupted: usize,
    pub skipped_oom: usize,
    pub left_queued: usize,
}

/// Run `runs` (already `queued`/`interrupted`/`failed` in the store) with the backend of `res`: local
/// processes on this machine's devices, or Slurm jobs ([`crate::slurm`]).
pub async fn execute(
    store: &RunStore,
    runs: Vec<RunRow>,
    res: &Resources,
    engine: &EngineCommand,
) -> Result<Summary> {
    match res.backend {
        Backend::Local => execute_local(store, runs, res, engine).await,
        Backend::Slurm => crate::slurm::execute(store, runs, res, engine).await,
    }
}

/// Run `runs` as engine processes over the devices of `res`.
/// Ctrl-C (or SIGTERM) stops launching, forwards SIGTERM to the engines and waits for their checkpoints.
async fn execute_local(
    store: &RunStore,
    runs: Vec<RunRow>,
    res: &Resources,
    engine: &EngineCommand,
) -> Result<Summary> {
    let (devices, mem_limit_gib) = resolve_devices(res);
    let per_run = if devices.iter().all(|d| d == "cpu") {
        res.procs_per_run
    } else {
        res.gpus_per_run
    };
    if per_run > devices.len() && devices.iter().all(|d| d != "cpu") {
        anyhow::bail!(
            "gpus_per_run = {per_run} but only {} devices are available ({})",
            devices.len(),
            devices.join(", ")
        );
    }
    let mut slots = DeviceSlots::new(&devices, per_run, res.max_parallel)
        .with_locks(store.home.join(".device-locks"));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads_per_run = (cores / res.cpu_parallel().max(res.procs_per_run)).max(1);
    let (writer, writer_task) = ingest::spawn_writer(store.clone());
    let (ui_tx, mut ui_rx) = mpsc::unbounded_channel::<(i64, Event)>();
    let pids: Arc<Mutex<HashMap<i64, Vec<u32>>>> = Arc::default();
    let ctx = LaunchContext {
        engine: engine.clone(),
        store: store.clone(),
        writer: writer.clone(),
        ui: ui_tx.clone(),
        pids: pids.clone(),
        threads_per_run,
    };
    let mut display = Display::new(runs.len());
    let mut summary = Summary::default();
    let mut queue: VecDeque<RunRow> = runs.into();
    let mut active = tokio::task::JoinSet::new();
    let mut stopping = false;
    let mut waiting_for_devices = false;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;

    loop {
        // Launch while devices are free.
        while !stopping && slots.capacity_for_one() {
            let Some(run) = queue.pop_front() else { break };
            if let (Some(limit), Some(est)) = (mem_limit_gib, run.mem_estimate) {
                let need = est as f64 / (1u64 << 30) as f64;
                if need > limit {
                    let why = format!(
                        "needs about {}, a device has {}",
                        gib_text(need),
                        gib_text(limit)
                    );
                    store
                        .set_status(run.id, RunStatus::SkippedOom, &why)
                        .await?;
                    display.finished(run.id, RunStatus::SkippedOom, &why);
                    summary.skipped_oom += 1;
                    continue;
                }
            }
            let Some(devs) = slots.take() else {
                // Free here but held by another runner: try again after the next event or a pause.
                if !waiting_for_devices {
                    display.line("waiting for GPUs that another runner is using…".into());
                }
                waiting_for_devices = true;
                queue.push_front(run);
                break;
            };
            waiting_for_devices = false;
            if !store.claim(run.id, &devs.join(",")).await? {
                display.line(format!("run {}: taken by another runner, skipping", run.id));
                slots.give(devs);
                continue;
            }
            display.started(run.id, &devs.join(","));
            active.spawn(launch(run, devs, ctx.clone()));
        }
        if active.is_empty() {
            if stopping || queue.is_empty() || !waiting_for_devices {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = tokio::signal::ctrl_c() => stopping = true,
                _ = sigterm.recv() => stopping = true,
            }
            continue;
        }
        tokio::select! {
            Some(ended) = active.join_next() => {
                let ended = ended.context("a run task panicked")?;
                ingest::flush(&writer).await;
                store.set_status(ended.run, ended.status, &ended.reason).await?;
                display.finished(ended.run, ended.status, &ended.reason);
                match ended.status {
                    RunStatus::Completed => summary.completed += 1,
                    RunStatus::Interrupted => summary.interrupted += 1,
                    _ => summary.failed += 1,
                }
                slots.give(ended.devices);
            }
            Some((run, ev)) = ui_rx.recv() => display.event(run, &ev),
            // Retry a GPU another runner holds even when no event of ours comes.
            _ = tokio::time::sleep(Duration::from_secs(2)), if waiting_for_devices => {}
            _ = tokio::signal::ctrl_c() => {
                // The engines treat a second signal as "exit now" (their last checkpoint stays usable).
                if stopping {
                    display.line("second Ctrl-C: engines exit now, without a new checkpoint".into());
                } else {
                    display.line("stopping: asking running engines to checkpoint (SIGTERM); Ctrl-C again to stop at once…".into());
                }
                stopping = true;
                signal_all(&pids, libc::SIGTERM);
            }
            // As Ctrl-C: the first asks the engines to checkpoint and stop, a second makes them exit now.
            _ = sigterm.recv() => {
                stopping = true;
                signal_all(&pids, libc::SIGTERM);
            }
        }
    }
    summary.left_queued = queue.len();
    drop(ctx);
    drop(writer);
    writer_task.await.context("the DB writer panicked")??;
    display.overall.finish_and_clear();
    Ok(summary)
}

/// SIGTERM to engine processes this runner started (they checkpoint and exit).
fn terminate(pids: &[u32]) {
    for pid in pids.iter().filter(|p| **p > 0) {
        send(*pid, libc::SIGTERM);
    }
}

/// `sig` to a process this runner started, followed by SIGCONT: a stopped process (SIGSTOP, Ctrl-Z)
/// would otherwise keep the signal pending forever, and the runner would wait for it forever.
fn send(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a process this runner started and has not reaped; no memory is touched.
    unsafe {
        libc::kill(pid as i32, sig);
        libc::kill(pid as i32, libc::SIGCONT);
    }
}

fn signal_all(pids: &Arc<Mutex<HashMap<i64, Vec<u32>>>>, sig: i32) {
    for pid in pids.lock().expect("pids lock").values().flatten() {
        send(*pid, sig);
    }
}

/// How long the other ranks of a failed run get to stop after SIGTERM before SIGKILL.
const RANK_STOP_GRACE: Duration = Duration::from_secs(60);

/// A memory size given in GiB, readable also below one (`512 MiB`).
pub(crate) fn gib_text(gib: f64) -> String {
    if gib < 1.0 {
        format!("{:.0} MiB", gib * 1024.0)
    } else {
        format!("{gib:.1} GiB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_slots_hand_out_and_take_back() {
        let mut cpu = DeviceSlots::new(&["cpu".into()], 1, None);
        let a = cpu.take().unwrap();
        let _b = cpu.take().unwrap();
        assert!(cpu.take().is_none());
        cpu.give(a);
        assert!(cpu.take().is_some());
        let mut gpus = DeviceSlots::new(
            &["cuda:0".into(), "cuda:1".into(), "cuda:2".into()],
            2,
            None,
        );
        assert_eq!(
            gpus.take().unwrap(),
            vec!["cuda:0".to_string(), "cuda:1".to_string()]
        );
        assert!(gpus.take().is_none());
        // max_parallel caps the runs on GPUs too: 4 GPUs, 1 per run, at most 2 at once.
        let four: Vec<String> = (0..4).map(|i| format!("cuda:{i}")).collect();
        let mut capped = DeviceSlots::new(&four, 1, Some(2));
        let first = capped.take().unwrap();
        assert!(capped.take().is_some() && capped.take().is_none());
        capped.give(first);
        assert_eq!(capped.take().unwrap(), vec!["cuda:0".to_string()]);
        // Unset, every GPU runs one.
        let mut all = DeviceSlots::new(&four, 1, None);
        assert_eq!((0..5).filter(|_| all.take().is_some()).count(), 4);
        // Two runners' slots over one lock dir share the GPUs; a given-back GPU is free again.
        let dir = tempfile::tempdir().unwrap();
        let two: Vec<String> = (0..2).map(|i| format!("cuda:{i}")).collect();
        let mut a = DeviceSlots::new(&two, 1, None).with_locks(dir.path().into());
        let mut b = DeviceSlots::new(&two, 1, None).with_locks(dir.path().into());
        let a0 = a.take().unwrap();
        assert_eq!(b.take().unwrap(), vec!["cuda:1".to_string()]);
        assert!(b.capacity_for_one() && b.take().is_none(), "cuda:0 is a's");
        a.give(a0);
        assert_eq!(b.take().unwrap(), vec!["cuda:0".to_string()]);
        // CPU slots are never locked.
        let cpu = DeviceSlots::new(&["cpu".into()], 1, None).with_locks(dir.path().into());
        assert!(cpu.lock_dir.is_none());
    }
}
