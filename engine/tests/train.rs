//! End-to-end: `engine train` runs, streams events, checkpoints, resumes exactly after SIGKILL, and refuses
//! bad input with one clear line.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn trains_and_streams_the_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(dir.path());
    let cfg = dir.path().join("run.toml");
    std::fs::write(
        &cfg,
        tiny_config(&data, "steps = 12\nmixer = \"attention\"\n"),
    )
    .unwrap();
    let run_dir = dir.path().join("run");
    let out = run(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        run_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let ev = events(&stdout);
    assert_eq!(ev.first().unwrap()["event"], "start");
    assert_eq!(ev.first().unwrap()["protocol"], 2);
    assert_eq!(ev.last().unwrap()["event"], "done");
    assert!(ev
        .iter()
        .any(|e| e["event"] == "eval" && e["val_bpb"].as_f64().unwrap() > 0.0));
    assert!(ev
        .iter()
        .any(|e| e["event"] == "checkpoint" && e["step"] == 12));
    assert_eq!(step_losses(&stdout).len(), 12);
    // stdout and metrics.jsonl carry the same lines; the run dir is self-contained.
    assert_eq!(
        std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap(),
        stdout
    );
    assert!(run_dir.join("config.toml").is_file() && run_dir.join("tokenizer.json").is_file());
    assert!(run_dir
        .join("checkpoints/step-00000012/model.safetensors")
        .is_file());

    // The same run dir is refused without --resume.
    let again = run(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        run_dir.to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));

    // Resume may extend the run.
    let more = run(&[
        "train",
        "--resume",
        run_dir.to_str().unwrap(),
        "--set",
        "steps=15",
    ]);
    assert!(
        more.status.success(),
        "{}",
        String::from_utf8_lossy(&more.stderr)
    );
    let steps: Vec<u64> = step_losses(&String::from_utf8(more.stdout).unwrap())
        .iter()
        .map(|s| s.0)
        .collect();
    assert_eq!(steps, vec![13, 14, 15]);
}

/// A run of 40 steps, and the same run SIGKILLed at a random moment after step 20's checkpoint and then
/// resumed, log the same per-step losses and end with a byte-identical model.
#[test]
fn resume_after_sigkill_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_run_config(dir.path(), "steps = 40\ngrad_accum = 2\n");
    let reference = dir.path().join("ref");
    let out = run(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        reference.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want: BTreeMap<u64, f64> = step_losses(&String::from_utf8(out.stdout).unwrap())
        .into_iter()
        .collect();
    assert_eq!(want.len(), 40);
    let want_model =
        std::fs::read(reference.join("checkpoints/step-00000040/model.safetensors")).unwrap();

    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ std::process::id() as u64;
    for attempt in 0..3 {
        let run_dir = dir.path().join(format!("killed-{attempt}"));
        let mut child = engine()
            .args([
                "train",
                "--config",
                cfg.to_str().unwrap(),
                "--out",
                run_dir.to_str().unwrap(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        // Wait for step 20's checkpoint, then kill after a random delay (0–150 ms).
        loop {
            let line = lines
                .next()
                .expect("engine ended before step 20's checkpoint")
                .unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v["event"] == "checkpoint" && v["step"] == 20 {
                break;
            }
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(seed % 150));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        drop(lines);

        let resumed = run(&["train", "--resume", run_dir.to_str().unwrap()]);
        assert!(
            resumed.status.success(),
            "{}",
            String::from_utf8_lossy(&resumed.stderr)
        );
        let got = step_losses(&String::from_utf8(resumed.stdout).unwrap());
        assert!(!got.is_empty() && got.last().unwrap().0 == 40);
        for (step, loss) in got {
            assert_eq!(
                want[&step], loss,
                "attempt {attempt}: step {step} differs after resume"
            );
        }
        let model =
            std::fs::read(run_dir.join("checkpoints/step-00000040/model.safetensors")).unwrap();
        assert!(
            model == want_model,
            "attempt {attempt}: final model differs"
        );
    }
}

/// A run of a tiny model that would train practically forever (no checkpoint of its own soon), started
/// in `dir` with stdout piped and stderr as given: its run dir and process.
fn endless_run(dir: &Path, stderr: Stdio, sets: &[&str]) -> (std::path::PathBuf, Reaped) {
    let cfg = write_run_config(dir, "steps = 100000\n");
    let run_dir = dir.join("run");
    let child = engine()
        .args(["train", "--config", cfg.to_str().unwrap()])
        .args(["--out", run_dir.to_str().unwrap()])
        .args(["--set", "checkpoint_every=1000"])
        .args(sets.iter().flat_map(|s| ["--set", s]))
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    (run_dir, Reaped::new(child))
}

fn has_checkpoint(run_dir: &Path, step: u64) -> bool {
    run_dir
        .join(format!("checkpoints/step-{step:08}/state.json"))
        .is_file()
}

#[test]
fn sigterm_checkpoints_and_exits_with_the_interrupted_code() {
    let dir = tempfile::tempdir().unwrap();
    let (run_dir, mut child) = endless_run(dir.path(), Stdio::null(), &["eval_every=1"]);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let t0 = Instant::now();
    loop {
        let v: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        if v["event"] == "step" && v["step"] == 3 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60));
    }
    unsafe { libc_kill(child.id() as i32, 15) };
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let last: serde_json::Value = serde_json::from_str(rest.last().unwrap()).unwrap();
    assert_eq!(last["event"], "interrupted");
    assert_eq!(last["signal"], "SIGTERM");
    // The step it stopped at had its scheduled eval: either it ran, or the signal cut it short between
    // batches and the checkpoint records it as due, so that the resume runs it first. Never lost.
    let step = last["step"].as_u64().unwrap();
    assert!(has_checkpoint(&run_dir, step));
    let evaluated = rest
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .any(|v| v["event"] == "eval" && v["step"] == step);
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run_dir.join(format!("checkpoints/step-{step:08}/state.json")))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(state["eval_due"], !evaluated, "{state}");
    if !evaluated {
        let out = engine()
            .args(["train", "--resume", run_dir.to_str().unwrap()])
            .args(["--set", &format!("steps={}", step + 1)])
            .stderr(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success());
        let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let first_eval = events.iter().find(|v| v["event"] == "eval").unwrap();
        assert_eq!(first_eval["step"], step, "{events:?}");
    }
}

/// `eval_batches` far beyond what the val split holds is bounded by it (not hours and GBs), and a SIGTERM
/// during a long eval stops it between batches: the run checkpoints with the eval marked due.
#[test]
fn a_huge_eval_is_bounded_and_a_signal_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let (run_dir, mut child) = endless_run(
        dir.path(),
        Stdio::piped(),
        &["eval_every=2", "eval_batches=1000000", "context_len=8"],
    );
    let stderr = child.stderr.take().unwrap();
    let err_lines = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    // Events through a channel, so that an eval that never ends fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(serde_json::from_str(&line).unwrap());
        }
    });
    let next = || {
        rx.recv_timeout(Duration::from_secs(120))
            .expect("no event for 120 s: the eval did not end")
    };
    // The bounded eval completes (in seconds, not hours); then a SIGTERM during the next one.
    while next()["event"] != "eval" {}
    loop {
        let v = next();
        if v["event"] == "step" && v["step"].as_u64().unwrap() % 2 == 1 {
            break;
        }
    }
    let signalled = Instant::now();
    unsafe { libc_kill(child.id() as i32, 15) };
    let mut rest = Vec::new();
    while let Ok(v) = rx.recv_timeout(Duration::from_secs(30)) {
        rest.push(v);
    }
    // Ended within seconds of the signal (an eval that ignores it would run for hours: the guard kills it).
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(30),
            "the eval did not stop for the signal"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130));
    let last = rest.last().unwrap();
    assert_eq!(last["event"], "interrupted", "{rest:?}");
    let err = err_lines.join().unwrap().join("\n");
    assert!(
        err.contains("eval_batches = 1000000 is more than the val split holds"),
        "{err}"
    );
    assert!(has_checkpoint(&run_dir, last["step"].as_u64().unwrap()));
}

/// A checkpoint that cannot be written (here: a file-size limit stops the optimizer file, as a full disk
/// would) fails the run with one line saying which step and that no earlier checkpoint exists, and leaves
/// no half-written folder behind.
#[test]
fn a_checkpoint_that_cannot_be_written_leaves_nothing_behind() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_run_config(dir.path(), "steps = 20\n");
    let run_dir = dir.path().join("run");
    let mut cmd = engine();
    cmd.args(["train", "--config", cfg.to_str().unwrap()])
        .args(["--out", run_dir.to_str().unwrap()]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: 300 << 10,
                rlim_max: 300 << 10,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().find(|l| l.starts_with("error:")).unwrap();
    assert!(
        line.contains("checkpoint of step 5 could not be written")
            && line.contains("no earlier checkpoint"),
        "{line}"
    );
    let left: Vec<_> = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A token file cut short in place under a running engine (not how data_prep writes) ends it with one
/// line saying so, not a silent SIGBUS death.
#[test]
fn a_token_file_cut_under_the_run_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut child) = endless_run(dir.path(), Stdio::piped(), &[]);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while let Some(Ok(l)) = lines.next() {
        if l.contains("\"event\":\"step\"") {
            break;
        }
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("data/train.bin"))
        .unwrap()
        .set_len(64)
        .unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("changed or shrank under the running engine (SIGBUS)"),
        "{stderr}"
    );
}

/// A killed runner leaves its engines writing into pipes nobody reads: they must go on, and checkpoint
/// on the parent-death signal, not die on the first progress line.
#[test]
fn closed_output_pipes_do_not_stop_training() {
    let dir = tempfile::tempdir().unwrap();
    let (run_dir, mut child) = endless_run(dir.path(), Stdio::piped(), &[]);
    drop(child.stderr.take());
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let v: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        if v["event"] == "step" && v["step"] == 2 {
            break;
        }
    }
    drop(lines);
    // Let it write a few more steps into the closed pipes.
    std::thread::sleep(Duration::from_millis(500));
    unsafe { libc_kill(child.id() as i32, 15) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}");
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let last = events(&metrics).pop().unwrap();
    assert_eq!(last["event"], "interrupted", "{last}");
    let step = last["step"].as_u64().unwrap();
    assert!(step > 2);
    assert!(has_checkpoint(&run_dir, step));
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn bad_input_gets_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(dir.path());
    let cfg = dir.path().join("run.toml");
    let cases: Vec<(String, Vec<String>, &str)> = vec![
        (tiny_config(&data, "dimm = 3\n"), vec![], "dimm"),
        ("dim = [\n".into(), vec![], "not valid TOML"),
        ("steps = 3\n".into(), vec![], "data_dir"),
        (
            tiny_config(&data, ""),
            vec!["data_dir=/nonexistent/data".into()],
            "does not exist",
        ),
        (
            tiny_config(&data, ""),
            vec!["context_len=100000".into()],
            "context_len",
        ),
        (tiny_config(&data, ""), vec!["dim=33".into()], "n_heads"),
        (tiny_config(&data, ""), vec!["device=tpu".into()], "device"),
        // Far beyond this machine's memory: refused with the estimate, not aborted by the allocator.
        (
            tiny_config(&data, ""),
            vec!["dim=200000".into()],
            "available: lower dim",
        ),
    ];
    for (i, (text, sets, needle)) in cases.into_iter().enumerate() {
        std::fs::write(&cfg, text).unwrap();
        let run_dir = dir.path().join(format!("bad-{i}"));
        let mut args = vec![
            "train".to_string(),
            "--config".into(),
            cfg.display().to_string(),
            "--out".into(),
            run_dir.display().to_string(),
        ];
        for s in sets {
            args.push("--set".into());
            args.push(s);
        }
        let out = engine().args(&args).output().unwrap();
        assert!(!out.status.success(), "case {i} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("case {i}: {stderr}"));
        assert!(line.contains(needle), "case {i}: {line}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("\"event\":\"error\""),
            "case {i}: no error event"
        );
    }
    // A missing config file and an unknown run to resume.
    let out = run(&[
        "train",
        "--config",
        "/nonexistent.toml",
        "--out",
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    let out = run(&[
        "train",
        "--resume",
        dir.path().join("nope").to_str().unwrap(),
    ]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("config.toml"));
}

#[test]
fn a_checkpoint_from_another_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(dir.path());
    let (run_dir, out) = first_run(dir.path(), &data, "steps = 5\n", &[]);
    assert!(out.status.success());
    let metrics_before = std::fs::read(run_dir.join("metrics.jsonl")).unwrap();
    let out = run(&[
        "train",
        "--resume",
        run_dir.to_str().unwrap(),
        "--set",
        "dim=64",
        "--set",
        "steps=8",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("different model config"), "{err}");
    assert!(err.contains("dim = 32 in the checkpoint, 64 now"), "{err}");
    // The refused --set must not have been saved (metrics.jsonl only records the refusal): a plain
    // resume still works.
    let saved = std::fs::read_to_string(run_dir.join("config.toml")).unwrap();
    assert!(!saved.contains("dim = 64"), "{saved}");
    let metrics = std::fs::read(run_dir.join("metrics.jsonl")).unwrap();
    assert!(metrics.starts_with(&metrics_before));
    let added = events(&String::from_utf8_lossy(&metrics[metrics_before.len()..]));
    assert_eq!(added.len(), 1);
    assert_eq!(added[0]["event"], "error");
    resume_to(&run_dir, 8, Path::new("."));
}

/// Resume `run_dir` (from folder `cwd`) up to `steps`; it must succeed and log that last step.
/// `engine train --resume RUN_DIR --set steps=N`, whatever its outcome.
fn resume_output(run_dir: &Path, steps: u64) -> std::process::Output {
    run(&[
        "train",
        "--resume",
        run_dir.to_str().unwrap(),
        "--set",
        &format!("steps={steps}"),
    ])
}

fn resume_to(run_dir: &Path, steps: u64, cwd: &Path) {
    let out = engine()
        .args(["train", "--resume", run_dir.to_str().unwrap()])
        .args(["--set", &format!("steps={steps}")])
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = step_losses(&String::from_utf8_lossy(&out.stdout)).pop();
    assert_eq!(last.map(|s| s.0), Some(steps));
}

/// A run started with a relative data_dir resumes from any folder (config.toml holds it absolute).
#[test]
fn a_run_resumes_from_another_folder() {
    let dir = tempfile::tempdir().unwrap();
    data_dir(dir.path());
    let cfg = tiny_config(Path::new("data"), "steps = 3\n");
    std::fs::write(dir.path().join("run.toml"), cfg).unwrap();
    let first = engine()
        .args(["train", "--config", "run.toml", "--out", "run"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(first.status.success());
    resume_to(&dir.path().join("run"), 5, Path::new("/"));
}

#[test]
fn a_data_dir_with_another_tokenizer_is_refused_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(dir.path());
    // Same vocabulary size, different text: a different tokenizer that the vocab check alone would pass.
    let corpus = dir.path().join("other.txt");
    data_prep::synth(&corpus, 300, 7).expect("synth corpus");
    let other = dir.path().join("data-other");
    let mut opts = data_prep::BuildOptions::new(vec![corpus], &other);
    opts.vocab_size = 400;
    opts.val_fraction = 0.1;
    data_prep::build(&opts).expect("data_prep build");
    let (run_dir, ok) = first_run(dir.path(), &data, "steps = 5\n", &[]);
    assert!(ok.status.success());
    let vocab = |d: &std::path::Path| {
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("meta.json")).unwrap()).unwrap();
        meta["vocab_size"].clone()
    };
    assert_eq!(
        vocab(&data),
        vocab(&other),
        "the fixture needs equal vocab sizes"
    );
    let out = run(&[
        "train",
        "--resume",
        run_dir.to_str().unwrap(),
        "--set",
        &format!("data_dir={}", other.display()),
        "--set",
        "steps=8",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("differs from the tokenizer"), "{err}");
    // The run's own tokenizer was not replaced.
    assert_eq!(
        std::fs::read(run_dir.join("tokenizer.json")).unwrap(),
        std::fs::read(data.join("tokenizer.json")).unwrap()
    );
}

#[test]
fn unusable_checkpoints_are_set_aside_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(dir.path());
    let (run_dir, ok) = first_run(
        dir.path(),
        &data,
        "steps = 10\n",
        &["--set", "keep_checkpoints=2"],
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let ck = run_dir.join("checkpoints");
    let truncate = |step: u64| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(ck.join(format!("step-{step:08}/model.safetensors")))
            .unwrap();
        f.set_len(16).unwrap();
    };
    // The newest is corrupt: resume from step 5, move step-10 aside, and keep the new checkpoints.
    truncate(10);
    let out = resume_output(&run_dir, 20);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(step_losses(&stdout).first().unwrap().0, 6, "{stdout}");
    assert!(ck.join("unusable-step-00000010").is_dir());
    let mut names: Vec<String> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("step-"))
        .collect();
    names.sort();
    assert_eq!(names, ["step-00000015", "step-00000020"]);
    // Every checkpoint corrupt: refuse, naming what to do, and touch nothing.
    truncate(15);
    truncate(20);
    let out = resume_output(&run_dir, 30);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("none of the 2 checkpoint(s)") && err.contains("start the run over"),
        "{err}"
    );
    assert!(ck.join("step-00000020").is_dir());
}

#[test]
fn a_data_dir_with_another_vocab_is_refused_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(dir.path());
    // The same corpus tokenized with a smaller vocabulary.
    let other = dir.path().join("data-small-vocab");
    let mut opts = data_prep::BuildOptions::new(vec![dir.path().join("corpus.txt")], &other);
    opts.vocab_size = 280;
    opts.val_fraction = 0.1;
    data_prep::build(&opts).expect("data_prep build");
    let (run_dir, out) = first_run(dir.path(), &data, "steps = 5\n", &[]);
    assert!(out.status.success());
    let out = run(&[
        "train",
        "--resume",
        run_dir.to_str().unwrap(),
        "--set",
        &format!("data_dir={}", other.display()),
        "--set",
        "steps=8",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vocab") && err.contains("data_dir"), "{err}");
    let out = run(&[
        "train",
        "--resume",
        run_dir.to_str().unwrap(),
        "--set",
        "steps=8",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn engine_env_settings_sit_between_the_file_and_set() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_run_config(dir.path(), "steps = 5\n");
    let last_step = |out: &std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        step_losses(&String::from_utf8_lossy(&out.stdout))
            .last()
            .unwrap()
            .0
    };
    // ENGINE_STEPS=3 in the environment, `sets` on the command line.
    let train_into = |name: &str, sets: &[&str]| {
        engine()
            .args(["train", "--config", cfg.to_str().unwrap()])
            .args(["--out", dir.path().join(name).to_str().unwrap()])
            .args(sets.iter().flat_map(|s| ["--set", s]))
            .env("ENGINE_STEPS", "3")
            .output()
            .unwrap()
    };
    assert_eq!(last_step(&train_into("a", &[])), 3);
    assert_eq!(last_step(&train_into("b", &["steps=2"])), 2);
}

/// A data dir that is not what its meta.json says is refused before the first step, with one line naming
/// the file and `data_prep verify`: a corrupt tokenizer, a meta.json edited to another vocab, a token id
/// out of range.
#[test]
fn a_damaged_data_dir_is_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(dir.path());
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, tiny_config(&data, "steps = 2\n")).unwrap();
    let train = |name: &str| {
        engine()
            .args(["train", "--config", cfg.to_str().unwrap(), "--out"])
            .arg(dir.path().join(name))
            .output()
            .unwrap()
    };
    assert!(train("good").status.success());
    let damage = |file: &str, edit: &dyn Fn(&mut Vec<u8>), needle: &str| {
        let path = data.join(file);
        let original = std::fs::read(&path).unwrap();
        let mut bytes = original.clone();
        edit(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();
        let out = train(&format!("bad-{file}"));
        std::fs::write(&path, original).unwrap();
        assert!(!out.status.success(), "{file}: trained");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = stderr.lines().find(|l| l.starts_with("error:")).unwrap();
        assert!(
            line.contains(file) && line.contains("data_prep verify") && line.contains(needle),
            "{file}: {line}"
        );
        assert!(
            !dir.path()
                .join(format!("bad-{file}/tokenizer.json"))
                .exists(),
            "{file}: the run took the data"
        );
    };
    damage(
        "tokenizer.json",
        &|b| b.truncate(b.len() / 2),
        "sha256 differs",
    );
    damage(
        "meta.json",
        &|b| {
            let text = String::from_utf8(b.clone()).unwrap();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            let vocab = v["vocab_size"].as_u64().unwrap();
            *b = text
                .replacen(
                    &format!("\"vocab_size\": {vocab}"),
                    &format!("\"vocab_size\": {}", vocab - 100),
                    1,
                )
                .into_bytes();
        },
        "tokenizer.json has vocab",
    );
    damage(
        "train.bin",
        &|b| {
            b[10] = 0xff;
            b[11] = 0xff;
        },
        "token id 65535 at position 5",
    );
}

/// A metrics.jsonl that cannot be written (a full disk; here /dev/full) ends the run with a line naming
/// the file; the checkpoint before it stays usable and a later resume continues from it.
#[test]
fn a_failed_metrics_write_ends_the_run_and_the_checkpoint_survives() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(dir.path());
    let (run_dir, out) = first_run(dir.path(), &data, "steps = 10\n", &[]);
    assert!(out.status.success());
    let metrics = run_dir.join("metrics.jsonl");
    let kept = std::fs::read(&metrics).unwrap();
    std::fs::remove_file(&metrics).unwrap();
    std::os::unix::fs::symlink("/dev/full", &metrics).unwrap();
    let out = resume_output(&run_dir, 20);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("metrics.jsonl") && stderr.contains("No space left"),
        "{stderr}"
    );
    std::fs::remove_file(&metrics).unwrap();
    std::fs::write(&metrics, kept).unwrap();
    resume_to(&run_dir, 20, dir.path());
}

/// `--pause-at` stops a run at a budget with an eval, a checkpoint and a `paused` event (exit 0); resumed
/// from rung to rung it ends bit-identical to the same run trained straight through (the learning-rate
/// schedule is the full run's).
#[test]
fn a_paused_and_resumed_run_equals_a_straight_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(dir.path());
    let events = |out: &std::process::Output| -> Vec<serde_json::Value> {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let sha = |evs: &[serde_json::Value]| {
        evs.iter()
            .find(|v| v["event"] == "done")
            .map(|v| v["params_sha256"].clone())
            .unwrap()
    };
    let (_, straight) = first_run(dir.path(), &data, "steps = 20\n", &[]);
    let straight = events(&straight);
    let paused_dir = dir.path().join("paused");
    std::fs::create_dir(&paused_dir).unwrap();
    // Rung 1 at 7 steps; rung 2 at 8 × 4 × 32 = 1024 tokens (step 8); then to the end.
    let (run_dir, out) = first_run(
        &paused_dir,
        &data,
        "steps = 20\n",
        &["--pause-at", "steps=7"],
    );
    let first = events(&out);
    let last = first.last().unwrap();
    assert_eq!(last["event"], "paused", "{first:?}");
    assert_eq!(last["step"], 7);
    assert!(first.iter().any(|v| v["event"] == "eval" && v["step"] == 7));
    assert!(has_checkpoint(&run_dir, 7));
    let r = run_dir.to_str().unwrap();
    let second = events(&run(&["train", "--resume", r, "--pause-at", "tokens=1024"]));
    assert_eq!(second.last().unwrap()["event"], "paused");
    assert_eq!(second.last().unwrap()["step"], 8);
    let third = events(&run(&["train", "--resume", r]));
    assert_eq!(sha(&third), sha(&straight));
    // The step losses of the pieces are the straight run's.
    let losses = |evs: &[serde_json::Value]| -> Vec<(u64, f64)> {
        evs.iter()
            .filter(|v| v["event"] == "step")
            .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
            .collect()
    };
    let pieces: Vec<(u64, f64)> = [first, second, third]
        .iter()
        .flat_map(|e| losses(e))
        .collect();
    assert_eq!(pieces, losses(&straight));
}

/// A run from before the authors' TTT keys existed (its config.toml and checkpoints name none of them)
/// resumes with the definition it was trained with — its loss curve is the straight legacy run's — while a
/// new run without them gets the authors' definition, written out in its config.toml.
#[test]
fn a_run_from_before_the_authors_keys_resumes_as_it_was_trained() {
    const LEGACY: &str = "ttt_token_eta = \"none\"\nttt_lr_bias = false\nttt_inner_rope = false\n\
        ttt_post_norm = false\nttt_backbone = \"transformer\"\nttt_conv_kernel = 4\nnorm_eps = 1e-5\n\
        quant_eps = \"add\"\n";
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(dir.path());
    let straight = dir.path().join("straight");
    std::fs::create_dir_all(&straight).unwrap();
    let (straight_run, out) = first_run(&straight, &data, &format!("steps = 10\n{LEGACY}"), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = step_losses(&String::from_utf8_lossy(&out.stdout));

    let old = dir.path().join("old");
    std::fs::create_dir_all(&old).unwrap();
    let (run_dir, out) = first_run(&old, &data, &format!("steps = 5\n{LEGACY}"), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Make it look written before the keys: strip them from config.toml; state.json never has them.
    let keys = [
        "ttt_token_eta",
        "ttt_lr_bias",
        "ttt_inner_rope",
        "ttt_post_norm",
        "ttt_backbone",
    ];
    let keys = [&keys[..], &["ttt_conv_kernel", "norm_eps", "quant_eps"]].concat();
    let cfg_path = run_dir.join("config.toml");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    assert!(cfg.contains("ttt_inner_rope = false"), "{cfg}");
    let stripped: String = cfg
        .lines()
        .filter(|l| !keys.iter().any(|k| l.starts_with(&format!("{k} ="))))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&cfg_path, stripped).unwrap();
    let state =
        std::fs::read_to_string(run_dir.join("checkpoints/step-00000005/state.json")).unwrap();
    assert!(keys.iter().all(|k| !state.contains(k)), "{state}");

    let out = resume_output(&run_dir, 10);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = step_losses(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(got, want[5..].to_vec(), "resumed with another definition");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    assert!(cfg.contains("ttt_inner_rope = false"), "{cfg}");

    // A new run without the keys: the authors' definition.
    let new = dir.path().join("new");
    std::fs::create_dir_all(&new).unwrap();
    let (run_dir, out) = first_run(&new, &data, "steps = 1\n", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = std::fs::read_to_string(run_dir.join("config.toml")).unwrap();
    for line in [
        "ttt_token_eta = \"index\"",
        "ttt_inner_rope = true",
        "quant_eps = \"clamp\"",
    ] {
        assert!(cfg.contains(line), "{line} missing: {cfg}");
    }
    drop(straight_run);
}
