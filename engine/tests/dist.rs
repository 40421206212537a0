//! Data-parallel training on CPU: ranks started by hand with torchrun-style variables.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

fn free_port() -> u16 {
    engine::dist::pick_free_port().unwrap()
}

/// Start `world` ranks of `engine train` with the given arguments.
fn ranks(world: usize, args: &[&str], port: u16) -> Vec<Reaped> {
    ranks_with_timeout(world, args, port, 20)
}

/// As [`ranks`], with `ENGINE_DIST_TIMEOUT` = `timeout_s`.
fn ranks_with_timeout(world: usize, args: &[&str], port: u16, timeout_s: u64) -> Vec<Reaped> {
    (0..world)
        .map(|rank| {
            engine()
                .args(args)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("ENGINE_DIST_TIMEOUT", timeout_s.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map(Reaped::new)
                .unwrap()
        })
        .collect()
}

fn finish(children: Vec<Reaped>) -> Vec<(bool, String, String)> {
    children
        .into_iter()
        .map(|c| {
            let out = c.into_inner().wait_with_output().unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
        .collect()
}

fn done_sha(stdout: &str) -> String {
    events(stdout)
        .into_iter()
        .find(|e| e["event"] == "done")
        .map(|e| e["params_sha256"].as_str().unwrap().to_string())
        .expect("a done event")
}

fn setup(dir: &Path, steps: u64, extra: &str) -> std::path::PathBuf {
    write_run_config(dir, &format!("steps = {steps}\n{extra}"))
}

#[test]
fn two_ranks_match_one_process_with_the_same_global_batch() {
    let dir = tempfile::tempdir().unwrap();
    // Float weights: the two computations differ in the last bits (summation order), and ternary rounding
    // would turn a last-bit difference at a rounding boundary into a whole quantisation step.
    let cfg = setup(dir.path(), 20, "weights = \"float\"\n");
    let single = dir.path().join("single");
    let out = run(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        single.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let single_out = String::from_utf8(out.stdout).unwrap();
    let want = step_losses(&single_out);

    let multi = dir.path().join("multi");
    let results = finish(ranks(
        2,
        &[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            multi.to_str().unwrap(),
        ],
        free_port(),
    ));
    for (ok, _, err) in &results {
        assert!(ok, "{err}");
    }
    let got = step_losses(&results[0].1);
    assert_eq!(got.len(), 20);
    // Each step reports its all-reduce time; the one-process run has none.
    let allreduce = |text: &str| {
        events(text)
            .into_iter()
            .filter(|e| e["event"] == "step")
            .filter(|e| {
                e["extra"]["allreduce_ms"]
                    .as_f64()
                    .is_some_and(|ms| ms >= 0.0)
            })
            .count()
    };
    assert_eq!((allreduce(&results[0].1), allreduce(&single_out)), (20, 0));
    for ((s1, a), (s2, b)) in want.iter().zip(&got) {
        assert_eq!(s1, s2);
        assert!(
            (a - b).abs() / a.abs() < 1e-4,
            "step {s1}: one process {a}, two ranks {b}"
        );
    }
    // The evals, shared between the ranks, give the one-process values.
    let val = |text: &str| -> Vec<(u64, f64)> {
        events(text)
            .into_iter()
            .filter(|e| e["event"] == "eval")
            .map(|e| (e["step"].as_u64().unwrap(), e["val_loss"].as_f64().unwrap()))
            .collect()
    };
    let (want_val, got_val) = (val(&single_out), val(&results[0].1));
    assert_eq!(want_val.len(), got_val.len());
    assert!(!want_val.is_empty());
    for ((s1, a), (s2, b)) in want_val.iter().zip(&got_val) {
        assert_eq!(s1, s2);
        assert!(
            (a - b).abs() / a.abs() < 1e-4,
            "eval at {s1}: one process {a}, two ranks {b}"
        );
    }
    // Weights identical on both ranks; only rank 0 wrote the run dir.
    assert_eq!(done_sha(&results[0].1), done_sha(&results[1].1));
    assert_eq!(
        std::fs::read_to_string(multi.join("metrics.jsonl")).unwrap(),
        results[0].1
    );
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(multi.join("checkpoints/step-00000020/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["world_size"], 2);

    // Resuming with another world size is refused.
    let out = run(&[
        "train",
        "--resume",
        multi.to_str().unwrap(),
        "--set",
        "steps=25",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 rank(s)"));
}

#[test]
fn killed_two_rank_run_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), 40, "");
    let args = |out: &Path| {
        vec![
            "train".to_string(),
            "--config".into(),
            cfg.display().to_string(),
            "--out".into(),
            out.display().to_string(),
        ]
    };
    let reference = dir.path().join("ref");
    let a = args(&reference);
    let results = finish(ranks(
        2,
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        free_port(),
    ));
    assert!(results.iter().all(|r| r.0), "{}", results[0].2);
    let want: BTreeMap<u64, f64> = step_losses(&results[0].1).into_iter().collect();
    let want_model =
        std::fs::read(reference.join("checkpoints/step-00000040/model.safetensors")).unwrap();

    let killed = dir.path().join("killed");
    let a = args(&killed);
    let mut children = ranks(
        2,
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        free_port(),
    );
    let mut lines = BufReader::new(children[0].stdout.take().unwrap()).lines();
    loop {
        let v: serde_json::Value =
            serde_json::from_str(&lines.next().expect("rank 0 ended early").unwrap()).unwrap();
        if v["event"] == "checkpoint" && v["step"] == 20 {
            break;
        }
    }
    for c in &mut children {
        c.kill().unwrap();
        c.wait().unwrap();
    }
    let k = killed.display().to_string();
    let results = finish(ranks(2, &["train", "--resume", &k], free_port()));
    assert!(results.iter().all(|r| r.0), "{}", results[0].2);
    let got = step_losses(&results[0].1);
    assert_eq!(got.last().unwrap().0, 40);
    for (step, loss) in got {
        assert_eq!(want[&step], loss, "step {step} differs after resume");
    }
    assert!(
        std::fs::read(killed.join("checkpoints/step-00000040/model.safetensors")).unwrap()
            == want_model
    );
}

/// Two ranks of a practically endless run without checkpoints (the collective after one waits ten times
/// longer) and `timeout_s` as ENGINE_DIST_TIMEOUT, once rank 0 logged step 3: the ranks and rank 0's
/// remaining stdout lines.
fn two_ranks_under_way(
    dir: &Path,
    timeout_s: u64,
) -> (
    Vec<Reaped>,
    std::io::Lines<BufReader<std::process::ChildStdout>>,
) {
    let cfg = setup(dir, 100_000, "");
    let out = dir.join("run");
    let mut children = ranks_with_timeout(
        2,
        &[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--set",
            "checkpoint_every=100000",
        ],
        free_port(),
        timeout_s,
    );
    let mut lines = BufReader::new(children[0].stdout.take().unwrap()).lines();
    loop {
        let v: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        if v["event"] == "step" && v["step"] == 3 {
            break;
        }
    }
    (children, lines)
}

/// Rank 0's stdout after it ended must hold an error event.
fn ends_with_an_error(lines: std::io::Lines<BufReader<std::process::ChildStdout>>) {
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(
        rest.iter().any(|l| l.contains("\"event\":\"error\"")),
        "{rest:?}"
    );
}

#[test]
fn a_dead_rank_fails_the_others_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let (mut children, lines) = two_ranks_under_way(dir.path(), 20);
    children[1].kill().unwrap();
    let t0 = Instant::now();
    let status = children[0].wait().unwrap();
    assert!(!status.success());
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "rank 0 took {:?} to notice",
        t0.elapsed()
    );
    ends_with_an_error(lines);
    children[1].wait().unwrap();
}

#[test]
fn a_hung_rank_fails_the_others_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (mut children, lines) = two_ranks_under_way(dir.path(), 4);
    // Rank 1 hangs (stopped, its sockets open): rank 0 must give up after ENGINE_DIST_TIMEOUT.
    let hung = children[1].id() as i32;
    // SAFETY: kill(2) on a child this test started.
    unsafe { libc::kill(hung, libc::SIGSTOP) };
    let t0 = Instant::now();
    let status = children[0].wait().unwrap();
    let waited = t0.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(hung, libc::SIGKILL) };
    children[1].wait().unwrap();
    assert!(!status.success());
    assert!(
        waited < Duration::from_secs(20),
        "rank 0 took {waited:?} to give up on a hung peer"
    );
    ends_with_an_error(lines);
}
