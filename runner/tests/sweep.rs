//! End-to-end: the real runner binary launches real engine processes on CPU and tracks them in SQLite.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{ok, report_json, runner, search_file, sweep_file, Reaped};

fn sqlite_steps(home: &Path, run: i64) -> Vec<i64> {
    // The step history as stored in SQLite's `metrics` table.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = runner::store::RunStore::open(home).await.unwrap();
        store
            .metric(run, "loss")
            .await
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect()
    })
}

#[test]
fn grid_sweep_runs_all_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let file = sweep_file(
        dir.path(),
        "grid",
        6,
        "batch_size = [2, 4]\ncontext_len = [8, 16]\nn_layers = [1, 2]",
    );
    // --dry-run launches nothing.
    let dry = ok(&runner(&home)
        .args(["sweep", "--dry-run"])
        .arg(&file)
        .output()
        .unwrap());
    assert_eq!(
        dry.lines().filter(|l| l.contains("params")).count(),
        8,
        "{dry}"
    );
    assert!(!home.join("runs.db").exists());

    let out = runner(&home).arg("sweep").arg(&file).output().unwrap();
    let table = ok(&out);
    assert!(table.contains("completed"));
    let rows = report_json(&home, "s1");
    assert_eq!(rows.len(), 8);
    for r in &rows {
        assert_eq!(r["status"], "completed", "{r}");
        assert_eq!(r["step"], 6);
        assert!(r["val_loss"].as_f64().unwrap() > 0.0);
        assert!(r["val_bpb"].as_f64().unwrap() > 0.0);
        assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(r["params"]["n_layers"].is_i64());
        assert!(Path::new(r["checkpoint"].as_str().unwrap()).is_dir());
        assert_eq!(
            sqlite_steps(&home, r["id"].as_i64().unwrap()),
            (1..=6).collect::<Vec<_>>()
        );
    }
    let csv = ok(&runner(&home)
        .args(["report", "s1", "--format", "csv", "--sort", "val_loss"])
        .output()
        .unwrap());
    assert_eq!(csv.lines().count(), 9);
    let html = dir.path().join("r.html");
    ok(&runner(&home)
        .args(["report", "s1", "--html"])
        .arg(&html)
        .output()
        .unwrap());
    let page = std::fs::read_to_string(&html).unwrap();
    // The home's database (or its WAL/shm files), however it is spelt, is never the report's file.
    let db_len = std::fs::metadata(home.join("runs.db")).unwrap().len();
    let spelt = home.join("..").join("home").join("runs.db");
    for target in [home.join("runs.db"), spelt, home.join("runs.db-wal")] {
        let out = runner(&home)
            .args(["report", "s1", "--html"])
            .arg(&target)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("the runner's database"),
            "{}: {err}",
            target.display()
        );
    }
    assert_eq!(
        std::fs::metadata(home.join("runs.db")).unwrap().len(),
        db_len
    );
    assert_eq!(report_json(&home, "s1").len(), 8);
    // The dashboard with its data inlined: nothing loaded from a server (its own browser test draws it).
    assert!(page.contains("id=\"inline-data\"") && page.contains("uPlot"));
    assert!(!page.contains("src=\"assets/") && !page.contains("href=\"assets/"));
    // Runs picked by id, with a sweep that also holds one of them: each run once, sorted.
    let some = ok(&runner(&home)
        .args(["report", "3", "s1", "1", "--format", "csv"])
        .output()
        .unwrap());
    assert_eq!(some.lines().count(), 9, "{some}");
    let picked = ok(&runner(&home)
        .args(["report", "5", "2", "--format", "csv"])
        .output()
        .unwrap());
    let ids: Vec<&str> = picked
        .lines()
        .skip(1)
        .map(|l| &l[..l.find(',').unwrap()])
        .collect();
    assert_eq!(ids, ["2", "5"], "{picked}");
    assert!(
        picked
            .lines()
            .next()
            .unwrap()
            .ends_with(",error,tokens,rung,sampler"),
        "{picked}"
    );
    let missing = runner(&home).args(["report", "s1", "99"]).output().unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no run with id 99"));
    let ls = ok(&runner(&home).arg("ls").output().unwrap());
    // A reader that stops early (`runner ls | head -1`) ends the listing quietly, no panic.
    for cmd in [["ls", ""], ["show", "s1"], ["report", "s1"]] {
        let mut child = runner(&home)
            .args(cmd.iter().filter(|a| !a.is_empty()))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{cmd:?}: {err}");
    }
    assert!(ls.contains("s1") && ls.contains("8 completed"), "{ls}");
    let show = ok(&runner(&home).args(["show", "1"]).output().unwrap());
    assert!(
        show.contains("checkpoints:") && show.contains("step-00000006"),
        "{show}"
    );
    // Resuming a completed run says so and does nothing.
    let again = ok(&runner(&home).args(["resume", "1"]).output().unwrap());
    assert!(again.contains("already completed"));
}

#[test]
fn killed_sweep_resumes_from_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let file = sweep_file(
        dir.path(),
        "killme",
        400,
        "n_layers = [1, 2]\nmixer = [\"ttt\", \"attention\"]",
    );
    let log = dir.path().join("runner.log");
    let mut child = runner(&home)
        .arg("sweep")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Wait until both first runs have a checkpoint, then SIGKILL the runner. Any checkpoint will do: the
    // tiny runs checkpoint every 5 steps and keep 3, so a fixed one may already be rotated away when looked for.
    let t0 = Instant::now();
    loop {
        let have = (1..=2).all(|r| has_checkpoint(&home.join(format!("run-{r}"))));
        if have {
            break;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            let engine_logs: Vec<String> = (1..=2)
                .map(|r| {
                    std::fs::read_to_string(home.join(format!("run-{r}/engine.log")))
                        .unwrap_or_default()
                })
                .collect();
            panic!(
                "no checkpoints appeared; runner log:\n{}\nengine logs:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default(),
                engine_logs.join("\n---\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // The engines notice their parent died (the parent-death signal), checkpoint and exit.
    let t0 = Instant::now();
    while (1..=2).any(|r| engine_alive(&home.join(format!("run-{r}")))) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "engines outlived their runner"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // ... each with a checkpoint at the step it stopped at: the kernel may signal a multi-threaded child
    // more than once, which must not count as the "second signal" that exits at once.
    for r in 1..=2 {
        let metrics = std::fs::read_to_string(home.join(format!("run-{r}/metrics.jsonl"))).unwrap();
        let last: serde_json::Value =
            serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
        assert!(
            last["event"] == "done"
                || (last["event"] == "interrupted" && last["signal"] == "parent"),
            "run {r} ended with {last}"
        );
    }
    let before = report_json(&home, "s1");
    let stopped_at: Vec<i64> = before.iter().map(|r| r["step"].as_i64().unwrap()).collect();
    // Reading the DB (report, ls, show) already marks runs whose runner and engine are gone.
    assert!(
        before.iter().all(|r| r["status"] != "running"),
        "dead runs still shown as running: {before:?}"
    );
    assert!(
        before.iter().any(|r| r["status"] == "interrupted"),
        "{before:?}"
    );

    let out = runner(&home).args(["resume", "s1"]).output().unwrap();
    ok(&out);
    let after = report_json(&home, "s1");
    assert_eq!(after.len(), 4);
    for r in &after {
        assert_eq!(r["status"], "completed", "{r}");
        let id = r["id"].as_i64().unwrap();
        // Continuous step history: every step once, 1..=400.
        assert_eq!(
            sqlite_steps(&home, id),
            (1..=400).collect::<Vec<_>>(),
            "run {id}"
        );
    }
    // The runs that were running resumed from a checkpoint rather than restarting.
    let resumed = (1..=2)
        .filter(|r| {
            let log = std::fs::read_to_string(home.join(format!("run-{r}/metrics.jsonl"))).unwrap();
            log.lines()
                .any(|l| l.contains("\"resumed\":true") && !l.contains("\"step\":0,"))
        })
        .count();
    assert_eq!(resumed, 2, "steps when killed: {stopped_at:?}");
}

/// `runner resume` right after the runner was SIGKILLed, while its engines are still writing their last
/// checkpoint: it waits for each (the run dir's lock), then resumes it; one resume completes every run.
#[test]
fn a_resume_right_after_a_killed_runner_completes_every_run() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let file = sweep_file(dir.path(), "quick", 300, "n_layers = [1, 2]");
    let mut child = runner(&home)
        .arg("sweep")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !(1..=2).all(|r| has_checkpoint(&home.join(format!("run-{r}")))) {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoints");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // At once: the engines are still checkpointing and exiting (still alive, holding their run dirs).
    let out = runner(&home).args(["resume", "s1"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(&out);
    for r in report_json(&home, "s1") {
        assert_eq!(r["status"], "completed", "{r}\n{err}");
        assert_eq!(
            sqlite_steps(&home, r["id"].as_i64().unwrap()),
            (1..=300).collect::<Vec<_>>()
        );
    }
    // Nothing left: a second resume has nothing to do.
    let again = ok(&runner(&home).args(["resume", "s1"]).output().unwrap());
    assert!(again.contains("nothing to do"), "{again}");
}

/// A reader that goes away (`runner sweep … | head`) does not make the sweep panic.
#[test]
fn a_closed_stdout_does_not_crash_a_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let file = sweep_file(dir.path(), "pipe", 3, "n_layers = [1]");
    let mut child = runner(&home)
        .arg("sweep")
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("panicked"), "{err}");
    assert_eq!(report_json(&home, "s1")[0]["status"], "completed");
}

/// A stopped engine (SIGSTOP) does not block a local sweep forever: after `stall_seconds` without an
/// event its run is stopped and failed with the reason, and the sweep ends.
#[test]
fn a_stalled_engine_is_stopped_and_failed() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let file = sweep_file(dir.path(), "stall", 100000, "n_layers = [1]");
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("max_parallel = 2", "max_parallel = 2\nstall_seconds = 3");
    std::fs::write(&file, text).unwrap();
    let child = runner(&home)
        .arg("sweep")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = Reaped(Some(child));
    let run_dir = home.join("run-1");
    let t0 = Instant::now();
    let pid = loop {
        if let (Some(pid), true) = (rank_pid(&run_dir, 0), has_checkpoint(&run_dir)) {
            break pid;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no engine");
        std::thread::sleep(Duration::from_millis(50));
    };
    unsafe { kill(pid, 19) }; // SIGSTOP
    let mut child = child;
    let t0 = Instant::now();
    let status = loop {
        if let Some(status) = child.0.as_mut().unwrap().try_wait().unwrap() {
            break status;
        }
        if t0.elapsed() > Duration::from_secs(90) {
            unsafe { kill(pid, 18) }; // SIGCONT; the guard then kills the runner
            panic!("the runner still waits for a stopped engine after 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let rows = report_json(&home, "s1");
    assert_eq!(rows[0]["status"], "failed", "{}", rows[0]);
    let why = rows[0]["error"].as_str().unwrap();
    assert!(why.contains("stall_seconds"), "{why}");
}

fn has_checkpoint(run_dir: &Path) -> bool {
    std::fs::read_dir(run_dir.join("checkpoints"))
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("step-"))
        })
        .unwrap_or(false)
}

fn engine_alive(run_dir: &Path) -> bool {
    let needle = run_dir.display().to_string();
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains(&needle))
            .unwrap_or(false)
    })
}

#[test]
fn two_runners_share_one_home() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let a = sweep_file(dir.path(), "a", 8, "n_layers = [1, 2]");
    // Build the data once so both runners find it.
    ok(&runner(&home)
        .args(["sweep", "--dry-run"])
        .arg(&a)
        .output()
        .unwrap());
    let b = sweep_file(dir.path(), "b", 8, "context_len = [8, 16]");
    let ca = runner(&home)
        .arg("sweep")
        .arg(&a)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let cb = runner(&home)
        .arg("sweep")
        .arg(&b)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (oa, ob) = (
        ca.wait_with_output().unwrap(),
        cb.wait_with_output().unwrap(),
    );
    assert!(
        oa.status.success(),
        "{}",
        String::from_utf8_lossy(&oa.stderr)
    );
    assert!(
        ob.status.success(),
        "{}",
        String::from_utf8_lossy(&ob.stderr)
    );
    let all = report_json(&home, "s1")
        .into_iter()
        .chain(report_json(&home, "s2"))
        .collect::<Vec<_>>();
    assert_eq!(all.len(), 4);
    assert!(all
        .iter()
        .all(|r| r["status"] == "completed" && r["step"] == 8));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let check: String = rt.block_on(async {
        let store = runner::store::RunStore::open(&home).await.unwrap();
        store.integrity_check().await.unwrap()
    });
    assert_eq!(check, "ok");
}

#[test]
fn a_crashing_engine_fails_its_run_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let file = sweep_file(dir.path(), "crash", 5, "n_layers = [1]");
    let fake = dir.path().join("fake-engine.sh");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'CUDA error: out of cheese' >&2\nexit 3\n",
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&fake)
        .status()
        .unwrap();
    let out = runner(&home)
        .arg("sweep")
        .arg(&file)
        .env("RUNNER_ENGINE", &fake)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a failed run makes the sweep exit non-zero"
    );
    let rows = report_json(&home, "s1");
    assert_eq!(rows[0]["status"], "failed");
    assert!(
        rows[0]["error"].as_str().unwrap().contains("out of cheese"),
        "{}",
        rows[0]
    );
}

#[test]
fn malformed_sweep_files_are_refused_before_launch() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let good =
        std::fs::read_to_string(sweep_file(dir.path(), "good", 5, "n_layers = [1, 2]")).unwrap();
    let cases = [
        (
            good.replace("n_layers = [1, 2]", "n_layerz = [1, 2]"),
            "n_layerz",
        ),
        (good.replace("n_layers = [1, 2]", "n_layers = []"), "empty"),
        (good.replace("dim = 16", "dim = 15"), "n_heads"),
        (
            good.replace("name = \"good\"", "name = ["),
            "not valid TOML",
        ),
        (
            good.replace("synth_stories = 200\n", "")
                .replace("/data\"", "/missing\""),
            "data_prep build",
        ),
        (
            good.replace("vocab_size = 300", "vocab_size = 999"),
            "vocab",
        ),
        // What the launch would fail, --dry-run fails too: 3 ranks cannot split a batch of 4.
        (
            good.replace("max_parallel = 2", "max_parallel = 3\nprocs_per_run = 3")
                .replace("[base]\n", "[base]\nbatch_size = 4\n"),
            "procs_per_run × grad_accum = 3 × 1",
        ),
        (
            good.replace("max_parallel = 2", "max_parallel = 2\nmemory_gb = -4"),
            "memory_gb = -4",
        ),
        (
            good.replace("max_parallel = 2", "max_parallel = 2\nmemory_gb = nan"),
            "memory_gb = NaN",
        ),
        (
            good.replace(
                "[sweep]\n",
                "[sweep]\nstrategy = \"random\"\ntrials = 1000000000\n",
            ),
            "at most 100000 runs",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let f = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&f, text).unwrap();
        let dry = runner(&home)
            .args(["sweep", "--dry-run"])
            .arg(&f)
            .output()
            .unwrap();
        assert!(!dry.status.success(), "case {i} passed --dry-run");
        let out = runner(&home).arg("sweep").arg(&f).output().unwrap();
        assert!(!out.status.success(), "case {i} launched");
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("case {i}: {err}"));
        assert!(
            line.contains(needle) && line.contains(&format!("bad{i}.toml")),
            "case {i}: {line}"
        );
    }
    // Two files that disagree on [resources] cannot share one queue.
    let other = dir.path().join("other.toml");
    std::fs::write(
        &other,
        good.replace("name = \"good\"", "name = \"other\"")
            .replace("max_parallel = 2", "max_parallel = 1"),
    )
    .unwrap();
    for dry in [false, true] {
        let out = runner(&home)
            .arg("sweep")
            .arg(dir.path().join("good.toml"))
            .arg(&other)
            .args(dry.then_some("--dry-run"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("different [resources]"),
            "dry run {dry}: {err}"
        );
    }
    // A bad RUNNER_ENGINE is refused before a sweep is recorded.
    let out = runner(&home)
        .arg("sweep")
        .arg(dir.path().join("good.toml"))
        .env("RUNNER_ENGINE", dir.path().join("no-engine"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("RUNNER_ENGINE"),
        "{err}"
    );
    assert!(!home.join("runs.db").exists(), "nothing was recorded");
    // An ENGINE_<KEY> variable would override every run while runs.db records the sweep's values:
    // refused, naming it (other ENGINE_ variables, such as ENGINE_DIST_TIMEOUT, are not run keys).
    for cmd in [vec!["sweep"], vec!["sweep", "--dry-run"]] {
        let out = runner(&home)
            .args(&cmd)
            .arg(dir.path().join("good.toml"))
            .env("ENGINE_BATCH_SIZE", "3")
            .env("ENGINE_DIST_TIMEOUT", "5")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && err.contains("ENGINE_BATCH_SIZE=3")
                && err.contains("base.batch_size"),
            "{cmd:?}: {err}"
        );
    }
    assert!(!home.join("runs.db").exists(), "nothing was recorded");
    // A run estimated above the memory limit is named in the dry run as one that will be skipped.
    let small = dir.path().join("small.toml");
    std::fs::write(
        &small,
        good.replace("max_parallel = 2", "max_parallel = 2\nmemory_gb = 0.0001"),
    )
    .unwrap();
    let dry = ok(&runner(&home)
        .args(["sweep", "--dry-run"])
        .arg(&small)
        .output()
        .unwrap());
    assert_eq!(
        dry.matches("will be skipped: a device has 0 MiB").count(),
        2,
        "{dry}"
    );
    // CI systems' own RUNNER_* variables are not sweep keys; RUNNER_<SECTION>__<KEY> still is.
    let ci_env = |c: &mut Command| {
        c.env("RUNNER_TEMP", "/tmp")
            .env("RUNNER_OS", "Linux")
            .env("RUNNER_NAME", "GitHub Actions 2");
    };
    let mut c = runner(&home);
    c.args(["sweep", "--dry-run"])
        .arg(dir.path().join("good.toml"));
    ci_env(&mut c);
    let dry = ok(&c.output().unwrap());
    assert!(dry.contains("sweep good"), "{dry}");
    let mut c = runner(&home);
    c.args(["sweep", "--dry-run"])
        .arg(dir.path().join("good.toml"))
        .env("RUNNER_RESOURCES__MAX_PARALLEL", "0");
    ci_env(&mut c);
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("max_parallel"),
        "{err}"
    );
    let out = runner(&home)
        .arg("sweep")
        .arg(dir.path().join("nope.toml"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    ok(&runner(&home)
        .arg("sweep")
        .arg(dir.path().join("good.toml"))
        .output()
        .unwrap());
    let out = runner(&home).args(["show", "99"]).output().unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no run with id 99")
    );
}

/// Pid of the engine rank `rank` of the run in `run_dir`, from /proc (cmdline + environ).
fn rank_pid(run_dir: &Path, rank: usize) -> Option<i32> {
    let needle = run_dir.display().to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let env = std::fs::read(e.path().join("environ")).ok()?;
        let env = String::from_utf8_lossy(&env);
        (String::from_utf8_lossy(&cmd).contains(&needle)
            && env.split('\0').any(|kv| kv == format!("RANK={rank}")))
        .then_some(pid)
    })
}

#[test]
fn data_parallel_runs_through_the_runner() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    // Same global batch, 1 process vs 2 ranks; float weights so last-bit differences stay small.
    let one = sweep_file(
        dir.path(),
        "one",
        20,
        "weights = [\"float\"]\nbatch_size = [4]",
    );
    let two = std::fs::read_to_string(&one)
        .unwrap()
        .replace("name = \"one\"", "name = \"two\"")
        .replace("max_parallel = 2", "max_parallel = 2\nprocs_per_run = 2");
    let two_path = dir.path().join("two.toml");
    std::fs::write(&two_path, two).unwrap();
    ok(&runner(&home).arg("sweep").arg(&one).output().unwrap());
    ok(&runner(&home).arg("sweep").arg(&two_path).output().unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (a, b) = rt.block_on(async {
        let store = runner::store::RunStore::open(&home).await.unwrap();
        (
            store.metric(1, "loss").await.unwrap(),
            store.metric(2, "loss").await.unwrap(),
        )
    });
    assert_eq!(a.len(), 20);
    assert_eq!(b.len(), 20);
    for ((s, x), (_, y)) in a.iter().zip(&b) {
        assert!((x - y).abs() / x.abs() < 1e-4, "step {s}: {x} vs {y}");
    }
    assert!(home.join("run-2/rank-1.log").is_file());
}

/// A 2-rank run of a practically endless sweep, started by a runner in `dir/home` (with `env` set), once
/// it has a checkpoint: the home, the runner and rank 1's pid.
fn dp_run_under_way(dir: &Path, env: &[(&str, &str)]) -> (PathBuf, std::process::Child, i32) {
    let home = dir.join("home");
    let file = sweep_file(dir, "dp", 100_000, "batch_size = [4]");
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("max_parallel = 2", "max_parallel = 2\nprocs_per_run = 2");
    std::fs::write(&file, text).unwrap();
    let child = runner(&home)
        .arg("sweep")
        .arg(&file)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let run_dir = home.join("run-1");
    let t0 = Instant::now();
    let pid = loop {
        let started = run_dir.join("checkpoints/step-00000005").is_dir();
        if let (true, Some(pid)) = (started, rank_pid(&run_dir, 1)) {
            break pid;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "rank 1 never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    (home, child, pid)
}

#[test]
fn a_killed_rank_fails_the_run_and_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (home, child, pid) = dp_run_under_way(dir.path(), &[]);
    let child = Reaped(Some(child));
    unsafe { kill(pid, 9) };
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let rows = report_json(&home, "s1");
    assert_eq!(rows[0]["status"], "failed");
    assert!(
        rows[0]["error"].as_str().unwrap().contains("rank"),
        "{}",
        rows[0]
    );
}

/// A rank stopped outright (SIGSTOP: it neither dies nor answers) fails the run after ENGINE_DIST_TIMEOUT
/// and the runner, which must also stop the stopped rank, does not wait for it forever.
#[test]
fn a_stopped_rank_fails_the_run_without_hanging_the_runner() {
    let dir = tempfile::tempdir().unwrap();
    let (home, mut child, pid) = dp_run_under_way(dir.path(), &[("ENGINE_DIST_TIMEOUT", "1")]);
    unsafe { kill(pid, 19) }; // SIGSTOP
    let t0 = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if t0.elapsed() > Duration::from_secs(90) {
            unsafe { kill(pid, 18) }; // SIGCONT, then let the runner's death stop it
            let _ = child.kill();
            panic!("the runner still waits for a stopped rank after 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let rows = report_json(&home, "s1");
    assert_eq!(rows[0]["status"], "failed", "{}", rows[0]);
    // Failed because of the stopped rank, after the run was well under way.
    assert!(rows[0]["step"].as_i64().unwrap() >= 5, "{}", rows[0]);
    let why = rows[0]["error"].as_str().unwrap();
    assert!(
        why.contains("did not answer within ENGINE_DIST_TIMEOUT"),
        "{why}"
    );
}

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

/// ASHA over 9 tiny configurations, eta = 3, one run at a time: runs pause at their rungs (192 and 576
/// tokens of 1,728) and the rule promotes them from their checkpoints. The order in which rung results
/// arrive is exactly what the rule implies for one worker; the runs never promoted end `pruned`; the
/// winner's weights equal its configuration trained straight through; a pruned run resumes to the end.
#[test]
fn asha_pauses_and_promotes_runs_by_the_rule() {
    use runner::search::early_stop::{next_promotion, Method};
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let file = search_file(
        dir.path(),
        "asha",
        27,
        "lr = [0.001, 0.003, 0.01]\nseed = [0, 1, 2]",
        &[("max_parallel = 2", "max_parallel = 1")],
        "[early_stop]\nmethod = \"asha\"\nmin_budget = 192\nreduction_factor = 3\n",
    );
    let out = runner(&home).arg("sweep").arg(&file).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(&out);
    assert!(stderr.contains("pruned by early stopping"), "{stderr}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let results = rt.block_on(async {
        let store = runner::store::RunStore::open(&home).await.unwrap();
        store.rung_results(1).await.unwrap()
    });
    // One worker: after each result, promote if the rule allows, else start the next configuration.
    let value = |run: i64, rung: usize| {
        results
            .iter()
            .find(|r| r.run == run && r.rung == rung)
            .unwrap_or_else(|| panic!("run {run} has no result at rung {rung}: {results:?}"))
            .value
    };
    let (mut seen, mut paused, mut order) = (Vec::new(), Vec::new(), Vec::new());
    let mut next_config = 1;
    loop {
        let (run, rung) = match next_promotion(Method::Asha, 3.0, &seen, &paused) {
            Some(run) => {
                let i = paused
                    .iter()
                    .position(|p: &(i64, usize)| p.0 == run)
                    .unwrap();
                (run, paused.remove(i).1 + 1)
            }
            None if next_config <= 9 => {
                next_config += 1;
                (next_config - 1, 0)
            }
            None => break,
        };
        // Rung 2 is the end of the run: no rung result, nothing to decide.
        if rung < 2 {
            order.push((run, rung));
            seen.push(runner::search::early_stop::RungResult {
                run,
                rung,
                value: value(run, rung),
            });
            paused.push((run, rung));
        }
    }
    let actual: Vec<(i64, usize)> = results.iter().map(|r| (r.run, r.rung)).collect();
    assert_eq!(actual, order, "rung results in arrival order");
    let at = |k: usize| results.iter().filter(|r| r.rung == k).count();
    assert_eq!(at(0), 9);
    assert!(at(1) >= 3, "{results:?}");
    let rows = report_json(&home, "s1");
    let completed = rows.iter().filter(|r| r["status"] == "completed").count();
    assert!(completed >= 1 && completed < at(1), "{rows:?}");
    for r in &rows {
        let id = r["id"].as_i64().unwrap();
        let top = results.iter().filter(|x| x.run == id).map(|x| x.rung).max();
        if r["status"] == "completed" {
            // Promoted from rung 1 to the end: the rung column says 2, past its last pause.
            assert_eq!((top, r["rung"].as_u64()), (Some(1), Some(2)), "{r}");
        } else {
            assert_eq!(r["status"], "pruned", "{r}");
            assert!(r["checkpoint"]
                .as_str()
                .is_some_and(|c| Path::new(c).is_dir()));
            assert_eq!(r["rung"].as_u64().map(|k| k as usize), top, "{r}");
        }
    }
    // The completed (promoted, paused twice) run equals its configuration trained straight through.
    let winner = rows.iter().find(|r| r["status"] == "completed").unwrap();
    let run_dir = home.join(format!("run-{}", winner["id"]));
    let done_sha = |metrics: &Path| -> serde_json::Value {
        std::fs::read_to_string(metrics)
            .unwrap()
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "done")
            .unwrap()["params_sha256"]
            .clone()
    };
    let straight = dir.path().join("straight");
    let out = Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(["engine", "train", "--config"])
        .arg(run_dir.join("run.toml"))
        .arg("--out")
        .arg(&straight)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        done_sha(&run_dir.join("metrics.jsonl")),
        done_sha(&straight.join("metrics.jsonl"))
    );
    // A run that recorded its rung and then failed (say, in its teardown) is not resumed past the rung
    // without a decision: `runner resume s1` leaves it pruned where it was.
    let stuck = rows.iter().find(|r| r["status"] == "pruned").unwrap();
    let stuck_id = stuck["id"].as_i64().unwrap();
    rt.block_on(async {
        let store = runner::store::RunStore::open(&home).await.unwrap();
        store
            .set_status(stuck_id, runner::store::RunStatus::Failed, "teardown")
            .await
            .unwrap();
    });
    ok(&runner(&home).args(["resume", "s1"]).output().unwrap());
    let again = report_json(&home, &stuck_id.to_string());
    assert_eq!(
        (again[0]["status"].as_str(), again[0]["step"].as_i64()),
        (Some("pruned"), stuck["step"].as_i64()),
        "{}",
        again[0]
    );
    // A pruned run trained to full length anyway.
    let pruned = rows.iter().find(|r| r["status"] == "pruned").unwrap()["id"].to_string();
    ok(&runner(&home).args(["resume", &pruned]).output().unwrap());
    let row = report_json(&home, &pruned);
    assert_eq!(row[0]["status"], "completed", "{}", row[0]);
    assert_eq!(row[0]["step"], 27);
}

/// A runner SIGKILLed in the middle of an ASHA search: `runner resume` continues the same search from
/// SQLite — every configuration gets its rung-0 result exactly once, no paused run is trained past its
/// rung unpromoted, and the search ends with every run completed or pruned.
#[test]
fn a_killed_asha_search_resumes_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let file = search_file(
        dir.path(),
        "asha",
        270,
        "lr = [0.001, 0.003, 0.01]\nseed = [0, 1, 2]",
        &[("eval_every = 5", "eval_every = 50")],
        "[early_stop]\nmethod = \"asha\"\nmin_budget = 1920\nreduction_factor = 3\n",
    );
    let mut child = runner(&home)
        .arg("sweep")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let results = |home: &Path| {
        rt.block_on(async {
            let store = runner::store::RunStore::open(home).await.unwrap();
            store.rung_results(1).await.unwrap()
        })
    };
    let t0 = Instant::now();
    while !home.join("runs.db").exists() || results(&home).len() < 4 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no rung results");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let out = runner(&home).args(["resume", "s1"]).output().unwrap();
    ok(&out);
    let results = results(&home);
    let rows = report_json(&home, "s1");
    let at = |run: i64, k: usize| {
        results
            .iter()
            .filter(|r| r.run == run && r.rung == k)
            .count()
    };
    for r in &rows {
        let id = r["id"].as_i64().unwrap();
        assert_eq!(at(id, 0), 1, "run {id}: {results:?}");
        let top = r["rung"].as_u64().unwrap() as usize;
        // A result at every rung it paused at, once each (rung 2 is the end of the run).
        assert!(
            (0..=top.min(1)).all(|k| at(id, k) == 1),
            "run {id}: {results:?}"
        );
        match r["status"].as_str().unwrap() {
            "completed" => assert_eq!((top, r["step"].as_i64()), (2, Some(270)), "{r}"),
            "pruned" => {
                // Stopped at its rung: 30 or 90 steps, never beyond.
                let rung_steps = [30, 90][top];
                assert_eq!(r["step"].as_i64(), Some(rung_steps), "{r}");
            }
            other => panic!("run {id} ended {other}: {r}"),
        }
    }
    assert!(rows.iter().any(|r| r["status"] == "completed"));
}

/// Fewer configurations than eta at a rung: the rule alone would keep none, so the search continues its
/// best paused run to the end rather than finish with nothing completed.
#[test]
fn a_search_smaller_than_eta_still_completes_its_best_run() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let file = search_file(
        dir.path(),
        "small",
        27,
        "lr = [0.001, 0.01]",
        &[],
        "[early_stop]\nmethod = \"asha\"\nbudget = \"steps\"\nmin_budget = 9\n",
    );
    ok(&runner(&home).arg("sweep").arg(&file).output().unwrap());
    let rows = report_json(&home, "s1");
    let status: Vec<&str> = rows.iter().map(|r| r["status"].as_str().unwrap()).collect();
    let done = rows.iter().find(|r| r["status"] == "completed").unwrap();
    assert_eq!(done["step"], 27, "{rows:?}");
    assert!(
        status.contains(&"completed") && status.contains(&"pruned"),
        "{status:?}"
    );
}

/// TPE and ASHA together: 14 trials over a log-uniform lr, an integer warm-up and a choice of depth; the
/// first 10 drawn at random, the rest suggested by TPE from the results so far (pruned trials by their last
/// rung), every value inside its range, and `runner resume` after the search has nothing left to do.
#[test]
fn tpe_with_early_stopping_samples_trials_as_results_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let file = search_file(
        dir.path(),
        "tpe",
        27,
        "strategy = \"tpe\"\ntrials = 14\nseed = 3\nlr = { log_uniform = [1e-4, 3e-2] }\n\
         warmup_steps = { int_uniform = [0, 10] }\nn_layers = [1, 2]",
        &[("warmup_steps = 2\n", "min_lr = 1e-5\n")],
        "[early_stop]\nmethod = \"asha\"\nmin_budget = 192\n",
    );
    // A range on a key that takes a name, and a range in a grid, are refused.
    for (bad, needle) in [
        (
            "strategy = \"tpe\"\ntrials = 3\nmixer = { uniform = [0, 1] }",
            "mixer takes a name",
        ),
        (
            "lr = { log_uniform = [1e-4, 3e-2] }",
            "a range needs strategy",
        ),
        (
            "strategy = \"random\"\ntrials = 3\nn_layers = { uniform = [1, 3] }",
            "int_uniform",
        ),
    ] {
        let f = sweep_file(dir.path(), "bad", 5, bad);
        let out = runner(&home)
            .args(["sweep", "--dry-run"])
            .arg(&f)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{bad}: {err}"
        );
    }
    ok(&runner(&home).arg("sweep").arg(&file).output().unwrap());
    let rows = report_json(&home, "s1");
    assert_eq!(rows.len(), 14, "{rows:?}");
    let samplers: Vec<&str> = rows
        .iter()
        .map(|r| r["sampler"].as_str().unwrap())
        .collect();
    for (i, r) in rows.iter().enumerate() {
        let lr = r["params"]["lr"].as_f64().unwrap();
        let w = r["params"]["warmup_steps"].as_i64().unwrap();
        assert!((1e-4..=3e-2).contains(&lr) && (0..=10).contains(&w), "{r}");
        let status = r["status"].as_str().unwrap();
        assert!(status == "completed" || status == "pruned", "{r}");
        // Random until 10 trials have a result (two run at once, so maybe a little longer), then TPE.
        if i < 10 {
            assert_eq!(samplers[i], "random", "{samplers:?}");
        }
    }
    let first_tpe = samplers
        .iter()
        .position(|s| *s == "tpe")
        .expect("TPE chose trials");
    assert!(
        samplers[first_tpe..].iter().all(|s| *s == "tpe"),
        "{samplers:?}"
    );
    let again = ok(&runner(&home).args(["resume", "s1"]).output().unwrap());
    assert!(again.contains("nothing to do"), "{again}");
}
