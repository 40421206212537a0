//! The local backend: hands free devices to runs, launches one `engine train` process per rank, streams
//! rank 0's protocol to the driver, and records how the processes ended. A run whose engine writes nothing
//! for `stall_seconds` (stopped, hung) is stopped and failed; a run dir still locked by a previous engine
//! (one a killed runner left checkpointing) is waited for before its resume starts.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use engine::events::{Event, EXIT_INTERRUPTED};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use super::{prepare_run_dir, EngineCommand, Executor, Interrupt, Launch, Update};
use crate::display::Display;
use crate::ingest::Msg;
use crate::search::Pause;
use crate::spec::{Devices, Resources};
use crate::store::{RunRow, RunStatus, RunStore};
use engine::train::budget::PauseAt;

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
        match std::fs::create_dir_all(dir)
            .and_then(|()| data_prep::fsutil::try_lock_file(&dir.join(name)))
        {
            Ok(Some(file)) => Ok(Some(file)),
            Ok(None) => Err(()),
            // An unusable lock dir, or a filesystem without flock (some NFS/Lustre mounts), must not stop
            // the sweep: fall back to this process's own accounting.
            Err(e) => {
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
        engine::device::host_memory_total()
            .map(|b| b as f64 / (1u64 << 30) as f64 / res.cpu_parallel() as f64)
    } else {
        gpu_mem
    });
    (devices, limit)
}

/// The skip reason's description of a per-run memory limit of `gib`.
pub fn limit_text(gib: f64) -> String {
    format!(
        "a device has {}",
        engine::device::gib_text((gib * (1u64 << 30) as f64) as u64)
    )
}

/// Ranks of one run on `devices`: `procs_per_run` on CPU, `gpus_per_run` on GPUs.
pub fn ranks_per_run(res: &Resources, devices: &[String]) -> usize {
    if devices.iter().all(|d| d == "cpu") {
        res.procs_per_run
    } else {
        res.gpus_per_run
    }
}

/// Last lines of a process's stderr, kept for the failure reason.
const STDERR_TAIL: usize = 20;

/// How long the other ranks of a failed run (or a stalled run's ranks) get to stop after SIGTERM before
/// SIGKILL.
const RANK_STOP_GRACE: Duration = Duration::from_secs(60);

/// Live engine pids by run (every rank), for signals.
type Pids = Arc<Mutex<HashMap<i64, Vec<u32>>>>;

/// What every launch shares: how to start engines, where updates go, which pids are live.
#[derive(Clone)]
struct LaunchContext {
    engine: EngineCommand,
    store: RunStore,
    updates: mpsc::UnboundedSender<Update>,
    writer: mpsc::UnboundedSender<Msg>,
    pids: Pids,
    threads_per_run: usize,
    stall: Duration,
    /// Set by Ctrl-C/SIGTERM: a launch still waiting for its run dir starts no engine.
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

/// Engine processes on this machine's devices.
pub struct Local {
    store: RunStore,
    slots: DeviceSlots,
    mem_limit_gib: Option<f64>,
    ctx: LaunchContext,
    rx: mpsc::UnboundedReceiver<Update>,
    /// Updates received by `wait` (kept here so that a cancelled wait loses none).
    pending: Vec<Update>,
    /// The devices of each running run, given back when it ends.
    devices: HashMap<i64, Vec<String>>,
    busy_retry: bool,
}

impl Local {
    pub fn new(
        store: &RunStore,
        res: &Resources,
        engine: EngineCommand,
        writer: mpsc::UnboundedSender<Msg>,
    ) -> Result<Self> {
        let (devices, mem_limit_gib) = resolve_devices(res);
        let per_run = ranks_per_run(res, &devices);
        if per_run > devices.len() && devices.iter().all(|d| d != "cpu") {
            anyhow::bail!(
                "gpus_per_run = {per_run} but only {} devices are available ({})",
                devices.len(),
                devices.join(", ")
            );
        }
        let slots = DeviceSlots::new(&devices, per_run, res.max_parallel)
            .with_locks(store.home.join(".device-locks"));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads_per_run = (cores / res.cpu_parallel().max(res.procs_per_run)).max(1);
        let (tx, rx) = mpsc::unbounded_channel();
        Ok(Self {
            store: store.clone(),
            slots,
            mem_limit_gib,
            ctx: LaunchContext {
                engine,
                store: store.clone(),
                updates: tx,
                writer,
                pids: Arc::default(),
                threads_per_run,
                stall: Duration::from_secs_f64(res.stall_seconds),
                stopping: Arc::default(),
            },
            rx,
            pending: Vec::new(),
            devices: HashMap::new(),
            busy_retry: false,
        })
    }
}

impl Executor for Local {
    async fn adopt(
        &mut self,
        runs: Vec<RunRow>,
        _pause_of: &mut dyn FnMut(&RunRow) -> Option<PauseAt>,
        _display: &mut Display,
    ) -> Result<Vec<RunRow>> {
        // Local engines never outlive their runner by much (the parent-death signal): nothing to adopt.
        // A run dir such an engine still holds is waited for at launch.
        Ok(runs)
    }

    fn has_room(&self) -> bool {
        self.slots.capacity_for_one()
    }

    fn active(&self) -> usize {
        self.devices.len()
    }

    fn memory_limit(&self) -> Option<(f64, String)> {
        self.mem_limit_gib.map(|l| (l, limit_text(l)))
    }

    async fn launch(&mut self, run: RunRow, pause: Option<Pause>) -> Result<Launch> {
        let pause_at = pause.map(|p| p.at);
        let Some(devs) = self.slots.take() else {
            // Free here but held by another runner: try again after the next update or a pause.
            self.busy_retry = true;
            return Ok(Launch::Busy(Box::new(run)));
        };
        self.busy_retry = false;
        let place = devs.join(",");
        if !self
            .store
            .claim(&run, &place, pause.map(|p| p.rung))
            .await?
        {
            self.slots.give(devs);
            return Ok(Launch::Taken);
        }
        self.devices.insert(run.id, devs.clone());
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            let id = run.id;
            let (status, reason) = follow(run, devs, pause_at, &ctx)
                .await
                .unwrap_or_else(|e| (RunStatus::Failed, format!("{e:#}")));
            ctx.pids.lock().expect("pids lock").remove(&id);
            let _ = ctx.updates.send(Update::Ended(id, status, reason));
        });
        Ok(Launch::Started(place))
    }

    async fn wait(&mut self) {
        let retry = self.busy_retry && self.slots.capacity_for_one();
        tokio::select! {
            Some(u) = self.rx.recv() => self.pending.push(u),
            // Retry a GPU another runner holds even when no update of ours comes.
            _ = tokio::time::sleep(Duration::from_secs(2)), if retry => {}
        }
    }

    async fn updates(&mut self) -> Result<Vec<Update>> {
        while let Ok(u) = self.rx.try_recv() {
            self.pending.push(u);
        }
        for u in &self.pending {
            if let Update::Ended(id, ..) = u {
                if let Some(devs) = self.devices.remove(id) {
                    self.slots.give(devs);
                }
            }
        }
        Ok(std::mem::take(&mut self.pending))
    }

    async fn interrupt(
        &mut self,
        second: bool,
        terminal: bool,
        display: &mut Display,
    ) -> Interrupt {
        if terminal {
            // The engines treat a second signal as "exit now" (their last checkpoint stays usable).
            display.line(if second {
                "second Ctrl-C: engines exit now, without a new checkpoint".into()
            } else {
                "stopping: asking running engines to checkpoint (SIGTERM); Ctrl-C again to stop at once…".into()
            });
        }
        // As Ctrl-C: the first asks the engines to checkpoint and stop, a second makes them exit now.
        self.ctx
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for pid in self.ctx.pids.lock().expect("pids lock").values().flatten() {
            send(*pid, libc::SIGTERM);
        }
        Interrupt::Stopping
    }
}

/// Wait while another process (an engine a killed runner left checkpointing and exiting) holds the run
/// dir's lock, saying so once; a stopped one is continued so that it can finish. Gives up after `limit`.
async fn wait_for_run_dir(run: &RunRow, ctx: &LaunchContext, limit: Duration) -> Result<()> {
    let path = Path::new(&run.run_dir).join(".lock");
    let started = tokio::time::Instant::now();
    let mut said = false;
    loop {
        // Free, or not lockable here (the engine reports what is wrong with the folder itself): go on.
        if !matches!(data_prep::fsutil::try_lock_file(&path), Ok(None)) {
            return Ok(());
        }
        if ctx.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        if !said {
            said = true;
            let by = run.pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
            let _ = ctx.updates.send(Update::Line(format!(
                "run {}: waiting for its previous engine{by} to finish its checkpoint and exit…",
                run.id
            )));
        }
        if let Some(pid) = run.pid {
            if crate::store::process_mentions(pid, &run.run_dir) {
                // SAFETY: kill(2) with SIGCONT on the run's own engine (its command line names the run dir).
                unsafe {
                    libc::kill(pid as i32, libc::SIGCONT);
                }
            }
        }
        if started.elapsed() > limit {
            anyhow::bail!(
                "run dir {} is still locked by another engine process{} after {:.0} s: stop it, then `runner resume {}`",
                run.run_dir,
                run.pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
                limit.as_secs_f64(),
                run.id
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Launch one run's engine (every rank) and follow it to the end: its final status and why.
async fn follow(
    run: RunRow,
    devices: Vec<String>,
    pause_at: Option<PauseAt>,
    ctx: &LaunchContext,
) -> Result<(RunStatus, String)> {
    let id = run.id;
    let run_dir = PathBuf::from(&run.run_dir);
    wait_for_run_dir(&run, ctx, ctx.stall).await?;
    if ctx.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        return Ok((
            RunStatus::Interrupted,
            "the runner was stopped before its engine started; `runner resume` continues it".into(),
        ));
    }
    let resume = prepare_run_dir(&ctx.store, &run).await?;
    // A runner killed outright may not have committed the engine's last lines: take the metrics and
    // checkpoints the engine already wrote to its run dir again (upserts, so nothing doubles).
    let starts = ctx.store.engine_starts(id).await?;
    crate::ingest::backfill(&ctx.writer, id, &run_dir.join("metrics.jsonl"), starts);
    let gpus: Vec<&str> = devices
        .iter()
        .filter_map(|d| d.strip_prefix("cuda:"))
        .collect();
    // One rank per GPU, or `procs_per_run` CPU ranks (one per CPU slot handed to this run).
    let world = devices.len().max(1);
    let device = if gpus.is_empty() { "cpu" } else { "cuda:0" };
    let args = super::TrainCommand {
        engine: &ctx.engine,
        run_dir: &run_dir,
        device,
        pause_at,
    }
    .args(resume);
    let port = if world > 1 { free_port()? } else { 0 };
    let mut children = Vec::with_capacity(world);
    for rank in 0..world {
        let mut cmd = tokio::process::Command::new(&ctx.engine.program);
        cmd.args(&args);
        // The runner's own rank variables (it may itself run under torchrun or srun) must not leak into
        // its engines; a single-rank run gets none at all.
        for var in [
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
            "SLURM_PROCID",
            "SLURM_NTASKS",
            "SLURM_STEP_NUM_TASKS",
            "SLURM_LOCALID",
        ] {
            cmd.env_remove(var);
        }
        // The engine stops by itself if this runner is gone before it could arm its parent-death signal.
        cmd.env(
            engine::train::process::PARENT_PID_VAR,
            std::process::id().to_string(),
        );
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
            cmd.env("RAYON_NUM_THREADS", ctx.threads_per_run.to_string());
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
                return Err(e)
                    .with_context(|| format!("starting {}", ctx.engine.program.display()));
            }
        }
    }
    let rank_pids: Vec<u32> = children.iter().map(|c| c.id().unwrap_or(0)).collect();
    ctx.pids
        .lock()
        .expect("pids lock")
        .insert(id, rank_pids.clone());
    // A Ctrl-C that came while the ranks were starting found no pid to signal: pass it on now.
    if ctx.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        terminate(&rank_pids);
    }
    if let Err(e) = ctx.store.set_pid(id, rank_pids[0]).await {
        terminate(&rank_pids);
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
    let mut paused: Option<(u64, f64)> = None;
    // Set when the engine said nothing for `stall`: it was stopped (SIGTERM + SIGCONT, then SIGKILL).
    let mut stalled = false;
    let mut lines = BufReader::new(rank0_stdout.expect("rank 0")).lines();
    loop {
        let wait = if stalled { RANK_STOP_GRACE } else { ctx.stall };
        let line = match tokio::time::timeout(wait, lines.next_line()).await {
            Err(_) if !stalled => {
                stalled = true;
                terminate(&rank_pids);
                continue;
            }
            Err(_) => {
                for pid in &rank_pids {
                    send(*pid, libc::SIGKILL);
                }
                break;
            }
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => break,
            // A line that is not UTF-8 is consumed and skipped; the stream goes on.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => continue,
            Ok(Err(e)) => {
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
            Event::Paused { step, val_loss, .. } => paused = Some((*step, *val_loss)),
            Event::Interrupted { .. } => interrupted = true,
            Event::Error { message } => error = Some(message.clone()),
            _ => {}
        }
        let _ = ctx.updates.send(Update::Event(id, ev));
    }
    // Wait for every rank; the first to fail stops the rest (SIGTERM: they checkpoint or exit).
    let mut failure: Option<(usize, std::process::ExitStatus, Vec<String>)> = None;
    let mut all_ok = true;
    let mut any_interrupted = false;
    let mut ended = vec![false; rank_pids.len()];
    let mut kill_at: Option<tokio::time::Instant> =
        stalled.then(|| tokio::time::Instant::now() + RANK_STOP_GRACE);
    loop {
        let next = match kill_at {
            None => waiters.join_next().await,
            Some(at) => match tokio::time::timeout_at(at, waiters.join_next()).await {
                Ok(next) => next,
                Err(_) => {
                    // A rank that neither stopped nor died (hung in a kernel call, or spinning):
                    // not reaped yet, so its pid is still its own.
                    for (pid, _) in rank_pids
                        .iter()
                        .zip(&ended)
                        .filter(|(p, e)| **p > 0 && !**e)
                    {
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
        // Killed by the SIGTERM this runner forwarded (a Ctrl-C right after the launch, before the engine
        // could install its handlers): stopped, not failed; its last checkpoint, if any, is intact.
        let our_sigterm = {
            use std::os::unix::process::ExitStatusExt;
            status.signal() == Some(libc::SIGTERM)
                && ctx.stopping.load(std::sync::atomic::Ordering::SeqCst)
        };
        match status.code() {
            Some(0) => {}
            Some(EXIT_INTERRUPTED) => any_interrupted = true,
            None if our_sigterm => any_interrupted = true,
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
    if stalled {
        return Ok((
            RunStatus::Failed,
            format!(
                "the engine wrote no event for {:.0} s (stall_seconds): stopped it as stalled (a stopped or hung process); its last checkpoint is kept, `runner resume {id}` continues it",
                ctx.stall.as_secs_f64()
            ),
        ));
    }
    Ok(if done && all_ok {
        (RunStatus::Completed, String::new())
    } else if let (Some((step, val_loss)), true) = (paused, all_ok) {
        (
            RunStatus::Paused,
            format!(
                "at {} (step {step}, val loss {val_loss:.4}): waiting for the search (the early-stopping rule, or forks to start from here)",
                pause_at.map_or("its rung".to_string(), |p| p.to_string())
            ),
        )
    } else if failure.is_none() && (interrupted || any_interrupted) {
        (
            RunStatus::Interrupted,
            "stopped by a signal; `runner resume` continues it".to_string(),
        )
    } else {
        // The failed rank's stderr tail, less the line that repeats the error event.
        let rank_failure =
            |(rank, status, tail): (usize, std::process::ExitStatus, Vec<String>),
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
