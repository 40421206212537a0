//! End-to-end: the search under kills, stops, races and removals (real runner and engine processes, real
//! SQLite). Each test names the fault it guards against; races are forced with the engine's set-up hook
//! (`BITLLAMA_TEST_SETUP_DELAY_MS`) or by stopping processes, and the stress test repeats them at random.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{ok, quiet, report_json, runner, search_file, Reaped};
use runner::store::{RunRow, RunStatus, RunStore};

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}
const SIGINT: i32 = 2;
const SIGKILL: i32 = 9;
const SIGCONT: i32 = 18;
const SIGSTOP: i32 = 19;

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a process this test started.
    unsafe {
        kill(pid as i32, sig);
    }
}

/// Every run of sweep 1 as the store has it (an empty list before the database exists).
fn runs(home: &Path) -> Vec<RunRow> {
    if !home.join("runs.db").exists() {
        return Vec::new();
    }
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = RunStore::open(home).await.unwrap();
        store.runs(Some(1)).await.unwrap()
    })
}

fn rung_results(home: &Path) -> Vec<runner::search::early_stop::RungResult> {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = RunStore::open(home).await.unwrap();
        store.rung_results(1).await.unwrap()
    })
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether process `pid` is running (not gone, not a zombie).
fn running(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s[s.rfind(')')? + 1..].trim_start().chars().next()?;
            Some(!matches!(state, 'Z' | 'X'))
        })
        .unwrap_or(false)
}

/// The events of a run's `metrics.jsonl`.
fn engine_events(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The `params_sha256` of the last `done` event in `metrics.jsonl`.
fn final_params(run_dir: &Path) -> Option<String> {
    engine_events(run_dir)
        .iter()
        .rev()
        .find(|v| v["event"] == "done")
        .and_then(|v| v["params_sha256"].as_str().map(String::from))
}

/// Train `run.toml` of `run_dir` straight through in `out`; its final params' hash.
fn straight_run(run_dir: &Path, out: &Path) -> String {
    let done = Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(["engine", "train", "--config"])
        .arg(run_dir.join("run.toml"))
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    final_params(out).expect("a straight run ends with done")
}

/// The first child process of `parent` (scanning `/proc/*/stat` for its parent pid): seen within a
/// millisecond or so of its fork, before an engine in it has done any set-up.
fn first_child(parent: u32, limit: Duration) -> i64 {
    let t0 = Instant::now();
    loop {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i64>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                continue;
            };
            if rest.split_whitespace().nth(1) == Some(&parent.to_string()) {
                return pid;
            }
        }
        assert!(t0.elapsed() < limit, "no child of {parent}");
    }
}

/// Fault 3: a runner killed while its engine is still setting up must not leave that engine training on
/// its own (the parent-death signal was armed only after set-up).
#[test]
fn an_engine_whose_runner_dies_during_its_set_up_stops() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let file = search_file(dir.path(), "long", 100_000, "lr = [0.001]", &[], "");
    let child = quiet(
        runner(&home)
            .arg("sweep")
            .arg(&file)
            .env("BITLLAMA_TEST_SETUP_DELAY_MS", "1500"),
    );
    let runner_pid = child.id();
    let mut sweep = Reaped(Some(child));
    // Killed the moment its engine process exists.
    let pid = first_child(runner_pid, Duration::from_secs(60));
    let mut c = sweep.0.take().unwrap();
    c.kill().unwrap();
    c.wait().unwrap();
    let t0 = Instant::now();
    while running(pid) && t0.elapsed() < Duration::from_secs(40) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let alive = running(pid);
    if alive {
        signal(pid as u32, SIGKILL);
    }
    assert!(
        !alive,
        "engine {pid} still trains 40 s after its runner died"
    );
}

/// Fault 8: Ctrl-C right after a launch stops the run (`interrupted`, exit 130), it does not fail it.
#[test]
fn ctrl_c_right_after_a_launch_interrupts_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let file = search_file(dir.path(), "long", 100_000, "lr = [0.001]", &[], "");
    let child = runner(&home)
        .arg("sweep")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let sweep = Reaped(Some(child));
    // Ctrl-C the moment the engine process exists (before it can install its handlers).
    first_child(pid, Duration::from_secs(60));
    signal(pid, SIGINT);
    let out = sweep.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let run = &runs(&home)[0];
    assert_eq!(
        (out.status.code(), run.status),
        (Some(130), RunStatus::Interrupted),
        "{run:?}\n{err}"
    );
}

/// Fault 2: progress an engine made while its runner was stopped and then killed — a promoted run that
/// reached its next rung and paused — is taken from its `metrics.jsonl` on resume: the rung result is
/// recorded, the rule decides on it, and the run is not sent back to a rung it already passed.
#[test]
fn a_resume_takes_in_a_rung_reached_after_the_runner_died() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let file = search_file(
        dir.path(),
        "asha",
        81,
        "lr = [0.001, 0.003, 0.01]",
        &[("max_parallel = 2", "max_parallel = 1")],
        "[early_stop]\nmethod = \"asha\"\nbudget = \"steps\"\nmin_budget = 9\n",
    );
    let child = quiet(runner(&home).arg("sweep").arg(&file));
    let pid = child.id();
    let mut sweep = Reaped(Some(child));
    // The promoted run: running again after its rung-0 result.
    let mut promoted = None;
    wait_until("a promotion", Duration::from_secs(120), || {
        promoted = runs(&home)
            .into_iter()
            .find(|r| r.status == RunStatus::Running && r.rung == Some(0));
        promoted.is_some()
    });
    signal(pid, SIGSTOP);
    let run = promoted.unwrap();
    let run_dir = PathBuf::from(&run.run_dir);
    // The engine trains on without its runner to its next rung (27 steps) and pauses there.
    wait_until(
        "the engine to pause at rung 1",
        Duration::from_secs(120),
        || {
            engine_events(&run_dir)
                .iter()
                .any(|e| e["event"] == "paused" && e["step"] == 27)
        },
    );
    let starts_before = engine_events(&run_dir)
        .iter()
        .filter(|e| e["event"] == "start")
        .count();
    signal(pid, SIGKILL);
    signal(pid, SIGCONT);
    let mut c = sweep.0.take().unwrap();
    c.wait().unwrap();
    ok(&runner(&home).args(["resume", "s1"]).output().unwrap());
    let results = rung_results(&home);
    let at_1: Vec<_> = results
        .iter()
        .filter(|r| r.run == run.id && r.rung == 1)
        .collect();
    assert_eq!(at_1.len(), 1, "{results:?}");
    let rows = report_json(&home, "s1");
    let row = rows.iter().find(|r| r["id"] == run.id).unwrap();
    // The only run at rung 1: with nothing completed the search continues it to its end.
    assert_eq!(
        (row["status"].as_str(), row["step"].as_i64()),
        (Some("completed"), Some(81)),
        "{row}"
    );
    // One engine start after the kill (to the end), none sent back to the rung it had reached.
    let starts_after = engine_events(&run_dir)
        .iter()
        .filter(|e| e["event"] == "start")
        .count();
    assert_eq!(starts_after, starts_before + 1, "{row}");
}

/// Fault 5: TPE + ASHA with one worker follows the rule: the first results are three trials at rung 0, not
/// trial 1 promoted alone rung after rung to its end.
#[test]
fn tpe_with_asha_on_one_worker_compares_trials_at_each_rung() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let file = search_file(
        dir.path(),
        "tpe1",
        27,
        "strategy = \"tpe\"\ntrials = 4\nseed = 5\nlr = { log_uniform = [1e-3, 1e-2] }",
        &[("max_parallel = 2", "max_parallel = 1")],
        "[early_stop]\nmethod = \"asha\"\nbudget = \"steps\"\nmin_budget = 3\n",
    );
    ok(&runner(&home).arg("sweep").arg(&file).output().unwrap());
    let results = rung_results(&home);
    let first: Vec<(i64, usize)> = results.iter().take(3).map(|r| (r.run, r.rung)).collect();
    assert_eq!(first, vec![(1, 0), (2, 0), (3, 0)], "{results:?}");
}

/// Fault 6: `rm` of a TPE trial then `resume` makes a new trial with a number (and so a point) of its own.
/// Fault 7: trials whose values the engine refuses are counted and reported as failed (exit 1), and a
/// resume does not relaunch them with an empty config.
#[test]
fn tpe_trials_are_numbered_once_and_refused_ones_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    // dim 18 is not divisible by n_heads = 4: those trials are refused by the engine.
    let file = search_file(
        dir.path(),
        "tpe",
        4,
        "strategy = \"tpe\"\ntrials = 6\nseed = 1\nlr = { log_uniform = [1e-3, 1e-2] }\ndim = [16, 18]",
        &[("n_heads = 2", "n_heads = 4")],
        "",
    );
    let out = runner(&home).arg("sweep").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let rows = runs(&home);
    let refused: Vec<&RunRow> = rows.iter().filter(|r| r.config.is_empty()).collect();
    assert!(
        !refused.is_empty(),
        "seed 1 draws dim 18 at least once: {rows:?}"
    );
    for r in &refused {
        assert_eq!(r.status, RunStatus::Failed, "{r:?}");
        assert!(r.params["dim"] == 18, "{r:?}");
        assert!(
            r.error.as_deref().is_some_and(|e| e.contains("n_heads")),
            "{r:?}"
        );
    }
    let failed = rows
        .iter()
        .filter(|r| r.status == RunStatus::Failed)
        .count();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("{failed} failed")), "{err}");
    // A resume leaves them failed with their reason.
    let before: Vec<Option<String>> = refused.iter().map(|r| r.error.clone()).collect();
    runner(&home).args(["resume", "s1"]).output().unwrap();
    let again = runs(&home);
    for (r, why) in refused.iter().zip(&before) {
        let now = again.iter().find(|x| x.id == r.id).unwrap();
        assert_eq!(
            (now.status, &now.error),
            (RunStatus::Failed, why),
            "{now:?}"
        );
    }
    // Remove a completed trial and resume: a new trial, with a new number and its own point.
    let victim = again
        .iter()
        .find(|r| r.status == RunStatus::Completed)
        .unwrap();
    ok(&runner(&home)
        .args(["rm", &victim.id.to_string(), "--yes"])
        .output()
        .unwrap());
    runner(&home).args(["resume", "s1"]).output().unwrap();
    let last = runs(&home);
    assert_eq!(last.len(), 6, "{last:?}");
    let numbers: BTreeSet<i64> = last.iter().map(|r| r.idx).collect();
    assert_eq!(numbers.len(), 6, "trial numbers repeat: {last:?}");
    assert!(!numbers.contains(&victim.idx), "{last:?}");
    let points: BTreeSet<String> = last.iter().map(|r| r.params.to_string()).collect();
    assert_eq!(points.len(), 6, "a trial repeats another's point: {last:?}");
}

/// Fault 9 and the smaller ones: extreme numbers and odd values are refused (or skipped) with one clear
/// line, never a panic.
#[test]
fn extreme_and_odd_values_get_a_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    for (sweep, needle) in [
        (
            "strategy = \"tpe\"\ntrials = 3\nlr = { uniform = [-1e308, 1e308] }",
            "wider than a number",
        ),
        (
            "strategy = \"random\"\ntrials = -3\nlr = [0.1, 0.2]",
            "at least 1",
        ),
        (
            "strategy = \"tpe\"\ntrials = 3\ntie_embeddings = { uniform = [0, 1] }",
            "[true, false]",
        ),
    ] {
        let f = search_file(dir.path(), "odd", 5, sweep, &[], "");
        let out = runner(&home)
            .args(["sweep", "--dry-run"])
            .arg(&f)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{sweep}: {err}");
        assert!(err.contains(needle), "{sweep}: {err}");
    }
    // A model no machine holds: its memory estimate saturates, so the run is skipped, not launched.
    let f = search_file(
        dir.path(),
        "huge",
        5,
        "dim = [4611686018427387904]",
        &[("n_heads = 2", "n_heads = 1")],
        "",
    );
    let out = runner(&home).arg("sweep").arg(&f).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(101), "{err}");
    let rows = runs(&home);
    assert_eq!(rows.len(), 1, "{err}");
    assert_eq!(rows[0].status, RunStatus::SkippedOom, "{err}");
    assert!(rows[0].mem_estimate.is_some_and(|m| m > 0), "{:?}", rows[0]);
}

/// A queued run of a sweep a live runner is running is that runner's: `rm` refuses it.
#[test]
fn rm_refuses_a_queued_run_of_a_live_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let file = search_file(
        dir.path(),
        "q",
        100_000,
        "lr = [0.001, 0.002]",
        &[("max_parallel = 2", "max_parallel = 1")],
        "",
    );
    let child = quiet(runner(&home).arg("sweep").arg(&file));
    let pid = child.id();
    let sweep = Reaped(Some(child));
    wait_until("the first run", Duration::from_secs(60), || {
        runs(&home).iter().any(|r| r.pid.is_some())
    });
    let queued = runs(&home)
        .into_iter()
        .find(|r| r.status == RunStatus::Queued)
        .unwrap();
    let out = runner(&home)
        .args(["rm", &queued.id.to_string(), "--yes"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("stop that runner first"),
        "{err}"
    );
    signal(pid, SIGINT);
    sweep.wait_with_output().unwrap();
    assert_eq!(runs(&home).len(), 2);
}

/// The stress test: two runners and a killer on one TPE + ASHA search. Runners are started, SIGKILLed
/// and resumed at random moments (seeded) for a while, then one runner finishes the search. Afterwards:
/// one result per (run, rung) reached, no run trained past a rung without a promotion, no trial number
/// or point twice, every run ended, and every completed run's final weights equal to a straight run of
/// its config.
#[test]
fn two_runners_and_a_killer_keep_a_search_consistent() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let file = search_file(
        dir.path(),
        "stress",
        600,
        "strategy = \"tpe\"\ntrials = 8\nseed = 7\nlr = { log_uniform = [1e-3, 3e-2] }",
        &[("max_parallel = 2", "max_parallel = 1")],
        "[early_stop]\nmethod = \"asha\"\nbudget = \"steps\"\nmin_budget = 40\n",
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let start = |resume: bool| {
        let mut c = runner(&home);
        if resume {
            c.args(["resume", "s1"]);
        } else {
            c.arg("sweep").arg(&file);
        }
        Reaped(Some(
            c.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ))
    };
    let ended = |home: &Path| {
        let rows = runs(home);
        rows.len() == 8
            && rows
                .iter()
                .all(|r| matches!(r.status, RunStatus::Completed | RunStatus::Pruned))
    };
    let mut pair = [start(false), start(true)];
    let t0 = Instant::now();
    let mut kills = 0;
    // The killer: every 0.2–1.5 s one of the two runners is SIGKILLed (if still running) and a new one
    // resumes the search in its place, for 40 s or until the search has ended.
    while t0.elapsed() < Duration::from_secs(40) && !ended(&home) {
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..1500)));
        let victim = &mut pair[rng.gen_range(0..2)];
        if let Some(c) = victim.0.as_mut() {
            if c.try_wait().unwrap().is_none() {
                c.kill().unwrap();
                kills += 1;
            }
            c.wait().unwrap();
        }
        *victim = start(true);
    }
    for r in &mut pair {
        if let Some(c) = r.0.as_mut() {
            c.wait().unwrap();
        }
    }
    // Engines a killed runner left stop at their next step; then one runner finishes the search.
    let mut last = String::new();
    for _ in 0..5 {
        if ended(&home) {
            break;
        }
        let out = runner(&home).args(["resume", "s1"]).output().unwrap();
        last = String::from_utf8_lossy(&out.stderr).into_owned();
    }
    let rows = runs(&home);
    eprintln!(
        "stress: {kills} runners killed in {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(kills > 0);
    assert_eq!(rows.len(), 8, "{rows:?}\n{last}");
    let results = rung_results(&home);
    // Rungs at 40, 120 and 360 steps of 600.
    let rung_steps = [40, 120, 360];
    let mut seen = BTreeMap::new();
    for r in &results {
        *seen.entry((r.run, r.rung)).or_insert(0) += 1;
    }
    assert!(seen.values().all(|n| *n == 1), "{results:?}");
    for r in &rows {
        let top = results
            .iter()
            .filter(|x| x.run == r.id)
            .map(|x| x.rung)
            .max();
        // A result at every rung below its highest.
        if let Some(top) = top {
            for k in 0..=top {
                assert!(seen.contains_key(&(r.id, k)), "run {}: {results:?}", r.id);
            }
        }
        match r.status {
            RunStatus::Completed => {
                assert_eq!(r.step, 600, "{r:?}");
                assert_eq!(top, Some(2), "completed without every rung result: {r:?}");
            }
            RunStatus::Pruned => {
                let top = top.unwrap_or_else(|| panic!("pruned without a rung result: {r:?}"));
                assert_eq!(
                    r.step, rung_steps[top],
                    "trained past rung {top} unpromoted: {r:?}"
                );
            }
            other => panic!("run {} ended {other}: {r:?}\n{last}", r.id),
        }
    }
    let numbers: BTreeSet<i64> = rows.iter().map(|r| r.idx).collect();
    let points: BTreeSet<String> = rows.iter().map(|r| r.params.to_string()).collect();
    assert_eq!((numbers.len(), points.len()), (8, 8), "{rows:?}");
    let completed: Vec<&RunRow> = rows
        .iter()
        .filter(|r| r.status == RunStatus::Completed)
        .collect();
    assert!(!completed.is_empty());
    for r in completed {
        let run_dir = Path::new(&r.run_dir);
        let straight = straight_run(run_dir, &dir.path().join(format!("straight-{}", r.id)));
        assert_eq!(
            final_params(run_dir).as_deref(),
            Some(straight.as_str()),
            "run {} differs from its straight run",
            r.id
        );
    }
}
