//! End-to-end on a real one-node Slurm cluster (opt-in: `BITLLAMA_SLURM_TEST=1`, as `.ci/run` sets it).
//! Starts slurmctld/slurmd/munged with `tests/slurm/cluster.sh`, runs a 2-run CPU sweep through
//! `backend = "slurm"`, `scancel`s one job mid-run, and checks it was resubmitted and finished from its
//! checkpoint; then detaches and re-adopts jobs, and runs one 2-rank CPU job (ranks from `srun`). Without
//! the opt-in it does nothing; with it, a cluster that cannot start fails the test.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::Reaped;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/slurm/cluster.sh");

/// The cluster this test started; stopped (after cancelling every job) when the test ends, even by a panic.
struct Cluster {
    state: PathBuf,
    conf: PathBuf,
}

impl Cluster {
    fn start(state: &Path) -> Self {
        let out = Command::new("bash")
            .arg(SCRIPT)
            .arg("start")
            .arg(state)
            .output()
            .expect("running tests/slurm/cluster.sh");
        assert!(
            out.status.success(),
            "the Slurm test cluster did not start (is `slurmctld slurmd slurm-client munge` installed?):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            state: state.to_path_buf(),
            conf: state.join("slurm.conf"),
        }
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .cmd("scancel")
            .arg("--full")
            .arg("-u")
            .arg("root")
            .status();
        std::thread::sleep(Duration::from_secs(1));
        let _ = Command::new("bash")
            .arg(SCRIPT)
            .arg("stop")
            .arg(&self.state)
            .status();
    }
}

fn last_step(run_dir: &Path) -> u64 {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "checkpoint")
        .filter_map(|v| v["step"].as_u64())
        .max()
        .unwrap_or(0)
}

#[test]
fn a_sweep_runs_on_slurm_and_a_cancelled_job_is_resubmitted() {
    if std::env::var_os("BITLLAMA_SLURM_TEST").is_none() {
        eprintln!(
            "skipped: set BITLLAMA_SLURM_TEST=1 to run the Slurm end-to-end test (.ci/run does)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(&dir.path().join("slurm"));
    let home = dir.path().join("home");
    let runs_dir = dir.path().join("shared-runs");
    std::fs::create_dir_all(&runs_dir).unwrap();
    let sweep_file = |name: &str, steps: u64| {
        let file = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &file,
            format!(
                "name = \"{name}\"\n[data]\ndir = \"{}\"\nsynth_stories = 200\nvocab_size = 300\n\
                 [base]\ndim = 16\nn_heads = 2\nttt_mini_batch = 4\nsteps = {steps}\nlog_every = 1\neval_every = 50\n\
                 eval_batches = 1\ncheckpoint_every = 5\nbatch_size = 4\ncontext_len = 16\n[sweep]\nn_layers = [1, 2]\n\
                 [resources]\nbackend = \"slurm\"\ndevices = [\"cpu\"]\nmax_parallel = 2\npoll_seconds = 0.5\n\
                 max_restarts = 2\nruns_dir = \"{}\"\nsbatch_args = [\"--mem=1G\"]\n",
                dir.path().join("data").display(),
                runs_dir.display()
            ),
        )
        .unwrap();
        file
    };
    let runner = |args: &[&str], log: &str| {
        let log = std::fs::File::create(dir.path().join(log)).unwrap();
        Reaped(Some(
            Command::new(env!("CARGO_BIN_EXE_runner"))
                .arg("--home")
                .arg(&home)
                .args(args)
                .env("SLURM_CONF", &cluster.conf)
                .env("RUST_LOG", "warn")
                .env_remove("RUNNER_ENGINE")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(log)
                .spawn()
                .unwrap(),
        ))
    };
    let file = sweep_file("on-slurm", 150);
    let mut child = runner(&["sweep", file.to_str().unwrap()], "runner.log");

    // Once run 1 has checkpointed a few times, cancel its job as a preemption would.
    let run1 = runs_dir.join("run-1");
    let t0 = Instant::now();
    while last_step(&run1) < 15 {
        assert!(
            t0.elapsed() < Duration::from_secs(240),
            "run 1 never reached step 15; runner log:\n{}",
            std::fs::read_to_string(dir.path().join("runner.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let jobs = cluster
        .cmd("squeue")
        .args(["-h", "-n", "bitllama-1", "-o", "%i"])
        .output()
        .unwrap();
    let job = String::from_utf8_lossy(&jobs.stdout).trim().to_string();
    assert!(!job.is_empty(), "no live Slurm job for run 1");
    let cancelled_at = last_step(&run1);
    assert!(cluster.cmd("scancel").arg(&job).status().unwrap().success());

    // The runner resubmits it with --resume and both runs finish.
    let out = child.0.take().unwrap().wait_with_output().unwrap();
    let log_text = std::fs::read_to_string(dir.path().join("runner.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "runner exit {:?}\nstdout: {}\nlog: {log_text}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(log_text.contains("resubmitted as job"), "{log_text}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = runner::store::RunStore::open(&home).await.unwrap();
        let runs = store.runs(Some(1)).await.unwrap();
        assert_eq!(runs.len(), 2);
        for r in &runs {
            assert_eq!(
                r.status.as_str(),
                "completed",
                "run {}: {:?}",
                r.id,
                r.error
            );
            assert_eq!(r.step, 150);
            assert!(r.slurm_job.is_none(), "a finished run holds no job");
            assert!(r.run_dir.starts_with(runs_dir.to_str().unwrap()));
        }
        assert_eq!(runs[0].restarts, 1, "run 1 was resubmitted once");
        assert_eq!(runs[1].restarts, 0);
        let events = store.events(1).await.unwrap();
        let text = format!("{events:?}");
        assert!(text.contains("resubmitted as Slurm job"), "{text}");
        // Every step of run 1 is in SQLite exactly once, from both jobs.
        let steps: Vec<i64> = store
            .metric(1, "loss")
            .await
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(steps, (1..=150).collect::<Vec<_>>());
    });
    // The second job resumed from a checkpoint at or after the one seen before the cancel.
    let metrics = std::fs::read_to_string(run1.join("metrics.jsonl")).unwrap();
    let resumed: Vec<u64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "start" && v["resumed"] == true)
        .filter_map(|v| v["step"].as_u64())
        .collect();
    assert_eq!(resumed.len(), 1, "{metrics}");
    assert!(resumed[0] >= cancelled_at, "{resumed:?} < {cancelled_at}");
    assert!(
        std::fs::read_dir(&run1)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("slurm-"))
            .count()
            == 2,
        "two jobs' output files in run 1"
    );

    // Sweep s2 (runs 3 and 4): the runner is killed outright while its jobs run; the jobs go on, and
    // `runner resume s2` follows them again. SIGTERM to that runner cancels the jobs (they checkpoint):
    // the runs are `interrupted`, and a last `runner resume s2` finishes them.
    let file2 = sweep_file("detach", 1000);
    let t_s2 = Instant::now();
    let mut first = runner(&["sweep", file2.to_str().unwrap()], "s2-a.log");
    let (run3, run4) = (runs_dir.join("run-3"), runs_dir.join("run-4"));
    let wait_for = |what: &dyn Fn() -> bool, why: &str| {
        let t0 = Instant::now();
        while !what() {
            assert!(t0.elapsed() < Duration::from_secs(240), "timed out: {why}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_for(
        &|| last_step(&run3) >= 10 && last_step(&run4) >= 10,
        "s2 runs checkpoint",
    );
    first.0.as_mut().unwrap().kill().unwrap();
    first.0.take().unwrap().wait().unwrap();
    let at_kill = last_step(&run3);
    eprintln!("runner killed at step {at_kill} (t = {:?})", t_s2.elapsed());
    wait_for(
        &|| last_step(&run3) >= at_kill + 10,
        "run 3 trains on without its runner",
    );
    let mut second = runner(&["resume", "s2"], "s2-b.log");
    let log_b = dir.path().join("s2-b.log");
    wait_for(
        &|| {
            std::fs::read_to_string(&log_b)
                .unwrap_or_default()
                .matches("following Slurm job")
                .count()
                == 2
        },
        "resume adopts both live jobs",
    );
    eprintln!(
        "adopted at step {} (t = {:?})",
        last_step(&run3),
        t_s2.elapsed()
    );
    // SAFETY: kill(2) on the runner this test started.
    unsafe {
        libc::kill(second.0.as_ref().unwrap().id() as i32, libc::SIGTERM);
    }
    let status = second.0.take().unwrap().wait().unwrap();
    let text = std::fs::read_to_string(&log_b).unwrap_or_default();
    assert_eq!(status.code(), Some(130), "{text}");
    let q = cluster
        .cmd("squeue")
        .args(["-h", "-o", "%i %T"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&q.stdout).trim().is_empty(),
        "jobs left: {}",
        String::from_utf8_lossy(&q.stdout)
    );
    rt.block_on(async {
        let store = runner::store::RunStore::open(&home).await.unwrap();
        for r in store.runs(Some(2)).await.unwrap() {
            assert_eq!(
                r.status.as_str(),
                "interrupted",
                "run {}: {:?}",
                r.id,
                r.error
            );
            assert!(r.step < 1000 && r.slurm_job.is_none());
        }
    });
    let mut last = runner(&["resume", "s2"], "s2-c.log");
    let out = last.0.take().unwrap().wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        std::fs::read_to_string(dir.path().join("s2-c.log")).unwrap_or_default()
    );
    rt.block_on(async {
        let store = runner::store::RunStore::open(&home).await.unwrap();
        for r in store.runs(Some(2)).await.unwrap() {
            assert_eq!(
                (r.status.as_str(), r.step),
                ("completed", 1000),
                "run {}: {:?}",
                r.id,
                r.error
            );
            let steps: Vec<i64> = store
                .metric(r.id, "loss")
                .await
                .unwrap()
                .into_iter()
                .map(|(s, _)| s)
                .collect();
            assert_eq!(
                steps,
                (1..=1000).collect::<Vec<_>>(),
                "run {}: every step ingested once",
                r.id
            );
            // Adopting the job did not record its history again in the event log.
            let log = format!("{:?}", store.events(r.id).await.unwrap());
            assert_eq!(
                log.matches("engine started at step 0").count(),
                1,
                "run {}: {log}",
                r.id
            );
        }
    });

    // Sweep s3 (run 5): one run of 2 CPU ranks in one job; `srun` hands each its rank through
    // SLURM_PROCID / SLURM_STEP_NUM_TASKS.
    let file3 = sweep_file("two-ranks", 20);
    let text = std::fs::read_to_string(&file3)
        .unwrap()
        .replace("n_layers = [1, 2]", "n_layers = [1]")
        .replace("max_parallel = 2", "max_parallel = 1\nprocs_per_run = 2");
    std::fs::write(&file3, text).unwrap();
    let mut third = runner(&["sweep", file3.to_str().unwrap()], "s3.log");
    let out = third.0.take().unwrap().wait_with_output().unwrap();
    let log3 = std::fs::read_to_string(dir.path().join("s3.log")).unwrap_or_default();
    assert!(out.status.success(), "{log3}");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(runs_dir.join("run-5/checkpoints/step-00000020/state.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(state["world_size"], 2, "{state}");

    // Sweep s4 (runs 6–8): early stopping on Slurm — jobs pause at their rung (the job script passes
    // --pause-at) and the promoted run is resubmitted from its checkpoint to the end.
    let file4 = sweep_file("asha-on-slurm", 27);
    let text = std::fs::read_to_string(&file4)
        .unwrap()
        .replace("n_layers = [1, 2]", "lr = [0.001, 0.003, 0.01]")
        + "[early_stop]\nmethod = \"asha\"\nbudget = \"steps\"\nmin_budget = 9\n";
    std::fs::write(&file4, text).unwrap();
    let mut fourth = runner(&["sweep", file4.to_str().unwrap()], "s4.log");
    let out = fourth.0.take().unwrap().wait_with_output().unwrap();
    let log4 = std::fs::read_to_string(dir.path().join("s4.log")).unwrap_or_default();
    assert!(out.status.success(), "{log4}");
    rt.block_on(async {
        let store = runner::store::RunStore::open(&home).await.unwrap();
        let runs = store.runs(Some(4)).await.unwrap();
        let results = store.rung_results(4).await.unwrap();
        assert_eq!(
            results.iter().filter(|r| r.rung == 0).count(),
            3,
            "{results:?}"
        );
        let done: Vec<_> = runs
            .iter()
            .filter(|r| r.status.as_str() == "completed")
            .collect();
        assert_eq!(done.len(), 1, "{runs:?}\n{log4}");
        assert_eq!(done[0].step, 27);
        for r in runs.iter().filter(|r| r.status.as_str() != "completed") {
            assert_eq!((r.status.as_str(), r.step), ("pruned", 9), "{r:?}");
        }
        let script = std::fs::read_to_string(Path::new(&done[0].run_dir).join("job.sh")).unwrap();
        assert!(
            !script.contains("--pause-at"),
            "the promoted job runs to the end:\n{script}"
        );
    });

    // Sweep s5 (runs 9–10): an IsoFLOP study with WSD on Slurm — the longer run's job pauses at the fork
    // point, the shorter run forks from its checkpoint there and trains only its cooldown.
    let fpt = common::tiny_flops_per_token(16);
    let file5 = sweep_file("isoflop-on-slurm", 1);
    let text = std::fs::read_to_string(&file5)
        .unwrap()
        .replace("steps = 1\n", "lr_schedule = \"wsd\"\n")
        .replace(
            "n_layers = [1, 2]",
            &format!(
                "strategy = \"isoflop\"\nbudgets = [{:e}, {:e}]\nmin_tokens_per_param = 0\ndim = [16]",
                20.0 * 64.0 * fpt,
                40.0 * 64.0 * fpt
            ),
        );
    std::fs::write(&file5, text).unwrap();
    let mut fifth = runner(&["sweep", file5.to_str().unwrap()], "s5.log");
    let out = fifth.0.take().unwrap().wait_with_output().unwrap();
    let log5 = std::fs::read_to_string(dir.path().join("s5.log")).unwrap_or_default();
    assert!(out.status.success(), "{log5}");
    rt.block_on(async {
        let store = runner::store::RunStore::open(&home).await.unwrap();
        let runs = store.runs(Some(5)).await.unwrap();
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert!(
            runs.iter().all(|r| r.status.as_str() == "completed"),
            "{runs:?}\n{log5}"
        );
        let fork = runs.iter().find(|r| r.parent_id.is_some()).expect("a fork");
        let first_start = std::fs::read_to_string(Path::new(&fork.run_dir).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "start")
            .unwrap();
        assert_eq!(
            first_start["step"].as_i64(),
            fork.fork_step,
            "{first_start}"
        );
        assert!(fork.fork_step.is_some_and(|s| s > 0));
    });
}
