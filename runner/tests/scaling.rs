//! End-to-end: IsoFLOP studies — planned from compute budgets, the stable phase of WSD runs reused by
//! forks that end bit-identical to straight runs, and scaling laws fitted by `runner scaling`.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{ok, quiet, report_json, runner, search_file, tiny_flops_per_token};

/// An IsoFLOP study of the tiny model: `budgets` in steps of the dim-16 model (64 tokens a step).
fn study(dir: &Path, name: &str, dims: &str, budget_steps: &[u64], extra_base: &str) -> PathBuf {
    let fpt = tiny_flops_per_token(16);
    let budgets: Vec<String> = budget_steps
        .iter()
        .map(|s| format!("{:e}", (*s as f64) * 64.0 * fpt))
        .collect();
    let file = search_file(
        dir,
        name,
        1,
        &format!(
            "strategy = \"isoflop\"\nbudgets = [{}]\nmin_tokens_per_param = 0\ndim = {dims}",
            budgets.join(", ")
        ),
        &[("steps = 1\n", extra_base)],
        "",
    );
    file
}

#[test]
fn an_isoflop_dry_run_prints_the_grid_and_skips_cells_below_the_floor() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let file = study(
        dir.path(),
        "iso",
        "[16, 32]",
        &[40, 80],
        "lr_schedule = \"wsd\"\n",
    );
    let out = runner(&home)
        .args(["sweep", "--dry-run"])
        .arg(&file)
        .output()
        .unwrap();
    let text = ok(&out);
    assert!(text.contains("4 runs planned"), "{text}");
    assert!(text.contains("isoflop:") && text.contains("D/N"), "{text}");
    assert!(text.contains("forks from run #"), "{text}");
    assert!(text.contains("total compute:"), "{text}");
    // A floor no cell reaches refuses the study; one some cells miss skips them with a line.
    let floor = std::fs::read_to_string(&file)
        .unwrap()
        .replace("min_tokens_per_param = 0", "min_tokens_per_param = 1e9");
    std::fs::write(&file, floor).unwrap();
    let out = runner(&home)
        .args(["sweep", "--dry-run"])
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("min_tokens_per_param"),
        "{err}"
    );
    // steps in [base] would fight the budget over the run's length.
    let f = search_file(
        dir.path(),
        "bad",
        10,
        "strategy = \"isoflop\"\nbudgets = [1e9]\ndim = [16]",
        &[],
        "",
    );
    let out = runner(&home)
        .args(["sweep", "--dry-run"])
        .arg(&f)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("remove steps"),
        "{err}"
    );
}

/// Each size trains its stable phase once; the smaller budget's run forks from it where its own cooldown
/// begins and ends with exactly the weights of a straight WSD run of its length.
#[test]
fn forks_reuse_the_stable_phase_and_end_bit_identical_to_straight_runs() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let file = study(
        dir.path(),
        "iso",
        "[16]",
        &[30, 60],
        "lr_schedule = \"wsd\"\ncooldown = \"1-sqrt\"\n",
    );
    ok(&runner(&home).arg("sweep").arg(&file).output().unwrap());
    let rows = report_json(&home, "s1");
    assert_eq!(rows.len(), 2, "{rows:?}");
    let fork = rows
        .iter()
        .find(|r| !r["parent_id"].is_null())
        .expect("a fork");
    let parent = rows.iter().find(|r| r["parent_id"].is_null()).unwrap();
    assert_eq!(fork["parent_id"], parent["id"]);
    // About 30 steps (the budget over the engine's FLOPs per token at the data's vocab) with a cooldown of
    // 0.2 of them: forked where that cooldown begins, inside the ~60-step run's stable phase.
    let steps =
        |r: &serde_json::Value| (r["params"]["max_tokens"].as_u64().unwrap()).div_ceil(64) as i64;
    let h = steps(fork);
    let start = h - (0.2 * h as f64).round() as i64;
    assert!((28..=32).contains(&h), "{fork}");
    assert_eq!(fork["fork_step"].as_i64(), Some(start), "{fork}");
    for r in &rows {
        assert_eq!(r["status"], "completed", "{r}");
    }
    assert_eq!(
        (fork["step"].as_i64(), parent["step"].as_i64()),
        (Some(h), Some(steps(parent)))
    );
    let run_dir = home.join(format!("run-{}", fork["id"]));
    let events = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(events.lines().next().unwrap()).unwrap();
    assert_eq!(
        (first["event"].as_str(), first["step"].as_i64()),
        (Some("start"), Some(start)),
        "{first}"
    );
    // The straight run of the fork's own config.
    let straight = dir.path().join("straight");
    let cfg: toml::Table = std::fs::read_to_string(run_dir.join("config.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let mut cfg = cfg;
    cfg.remove("device");
    std::fs::write(dir.path().join("fork.toml"), toml::to_string(&cfg).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(["engine", "train", "--config"])
        .arg(dir.path().join("fork.toml"))
        .arg("--out")
        .arg(&straight)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = |dir: &Path| -> String {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .rfind(|v| v["event"] == "done")
            .unwrap()["params_sha256"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(done(&run_dir), done(&straight));
}

/// A runner killed in the middle of a study: `runner resume` forks what is due from the checkpoints and
/// continues the stable phase from its last checkpoint, never from step 0.
#[test]
fn a_killed_study_resumes_without_retraining_its_stable_phase() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let file = study(
        dir.path(),
        "iso",
        "[16]",
        &[500, 1000, 2000],
        "lr_schedule = \"wsd\"\n",
    );
    let mut child = quiet(runner(&home).arg("sweep").arg(&file));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let parent_step = || -> i64 {
        if !home.join("runs.db").exists() {
            return 0;
        }
        rt.block_on(async {
            let store = runner::store::RunStore::open(&home).await.unwrap();
            store
                .runs(Some(1))
                .await
                .unwrap()
                .iter()
                .filter(|r| r.parent_id.is_none())
                .map(|r| r.step)
                .max()
                .unwrap_or(0)
        })
    };
    let t0 = Instant::now();
    // Past the first fork point (step ~400), before the end (~2,000).
    while parent_step() < 900 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the parent never got past step 900"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the study ended before the kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    ok(&runner(&home).args(["resume", "s1"]).output().unwrap());
    let rows = report_json(&home, "s1");
    assert_eq!(rows.len(), 3, "{rows:?}");
    for r in &rows {
        assert_eq!(r["status"], "completed", "{r}");
    }
    let parent = rows.iter().find(|r| r["parent_id"].is_null()).unwrap();
    let forks = rows
        .iter()
        .filter(|r| r["parent_id"] == parent["id"])
        .count();
    assert_eq!(forks, 2, "{rows:?}");
    // The parent's engine starts: from 0, then (after the kill) from a checkpoint past the first fork
    // point, never from 0 again.
    let starts: Vec<i64> =
        std::fs::read_to_string(home.join(format!("run-{}/metrics.jsonl", parent["id"])))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == "start")
            .map(|v| v["step"].as_i64().unwrap())
            .collect();
    assert_eq!(starts[0], 0, "{starts:?}");
    assert!(starts[1..].iter().all(|s| *s > 0), "{starts:?}");
}
