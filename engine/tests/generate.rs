//! End-to-end: `engine generate` from a run dir, a checkpoint dir and an exported file gives the same,
//! deterministic text; interactive mode reads prompts from stdin until `/quit` or EOF; bad inputs get one
//! `error:` line and a non-zero exit.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use common::*;

/// Train a tiny model into `dir/run` and return the run dir.
fn trained_run(dir: &Path, data: &Path, extra: &str) -> PathBuf {
    let cfg = dir.join("run.toml");
    std::fs::write(&cfg, tiny_config(data, &format!("steps = 20\n{extra}"))).unwrap();
    let run_dir = dir.join("run");
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
    run_dir
}

fn generate(checkpoint: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["generate", "--checkpoint", checkpoint.to_str().unwrap()];
    args.extend_from_slice(extra);
    run(&args)
}

fn ok_stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 output")
}

const GREEDY: [&str; 8] = [
    "--prompt",
    "Once upon a time",
    "--max-tokens",
    "20",
    "--seed",
    "1",
    "--temperature",
    "0",
];

#[test]
fn generates_deterministically_from_run_dir_checkpoint_dir_and_export() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(dir.path());
    let run_dir = trained_run(dir.path(), &data, "");

    let a = ok_stdout(&generate(&run_dir, &GREEDY));
    assert!(!a.trim().is_empty(), "no text generated");
    assert!(a.ends_with('\n'));
    let b = ok_stdout(&generate(&run_dir, &GREEDY));
    assert_eq!(a, b, "greedy generation is deterministic");

    // The newest checkpoint dir directly.
    let ck = run_dir.join("checkpoints/step-00000020");
    assert_eq!(ok_stdout(&generate(&ck, &GREEDY)), a);
    // ... also as a relative path from inside it (the run dir is found from the real path).
    let mut args = vec!["generate", "--checkpoint", "."];
    args.extend_from_slice(&GREEDY);
    let inside = engine().args(&args).current_dir(&ck).output().unwrap();
    assert_eq!(ok_stdout(&inside), a);

    // Export, then generate from the file alone.
    let file = dir.path().join("model.safetensors");
    let out = run(&[
        "export",
        "--checkpoint",
        run_dir.to_str().unwrap(),
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(file.is_file());
    assert_eq!(ok_stdout(&generate(&file, &GREEDY)), a);
    // A bare file name lands in the current folder.
    let bare = engine()
        .args(["export", "--checkpoint", run_dir.to_str().unwrap()])
        .args(["--out", "bare.safetensors"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    ok_stdout(&bare);
    // Two exports of one checkpoint are the same bytes.
    assert_eq!(
        std::fs::read(dir.path().join("bare.safetensors")).unwrap(),
        std::fs::read(&file).unwrap()
    );

    // Sampling is reproducible by seed.
    let sampled = [
        "--prompt",
        "The dog",
        "--max-tokens",
        "15",
        "--seed",
        "7",
        "--temperature",
        "0.9",
        "--top-k",
        "40",
        "--top-p",
        "0.95",
    ];
    let s1 = ok_stdout(&generate(&run_dir, &sampled));
    assert_eq!(ok_stdout(&generate(&file, &sampled)), s1);
}

#[test]
fn interactive_mode_reads_prompts_until_quit_or_eof() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(dir.path());
    let run_dir = trained_run(dir.path(), &data, "mixer = \"attention\"\n");
    let flags = ["--max-tokens", "12", "--temperature", "0"];
    let one = |prompt: &str| {
        let mut args = vec!["--prompt", prompt];
        args.extend_from_slice(&flags);
        ok_stdout(&generate(&run_dir, &args))
    };
    let expected = one("Once upon a time") + &one("The cat");

    let interact = |stdin: &str| {
        let mut child = engine()
            .args(["generate", "--checkpoint", run_dir.to_str().unwrap()])
            .args(flags)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        ok_stdout(&child.wait_with_output().unwrap())
    };
    // /quit stops (the prompt after it is never answered); empty lines are skipped.
    assert_eq!(
        interact("Once upon a time\n\nThe cat\n/quit\nNever answered\n"),
        expected
    );
    // EOF stops too, also without a final newline.
    assert_eq!(interact("Once upon a time\nThe cat"), expected);
}

/// stderr is exactly one line starting with `error:` and the exit code is non-zero.
fn assert_one_error_line(out: &Output, needle: &str) {
    assert!(!out.status.success(), "expected failure");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "want one line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(needle), "want {needle:?} in: {err}");
}

#[test]
fn bad_inputs_get_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(dir.path());
    let run_dir = trained_run(dir.path(), &data, "tie_embeddings = true\n");

    // Nothing there.
    let missing = dir.path().join("nope");
    assert_one_error_line(&generate(&missing, &GREEDY), "does not exist");

    // A folder without checkpoints.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_one_error_line(&generate(&empty, &GREEDY), "no valid checkpoint");

    // A corrupt exported file: one flipped byte, and a truncated one.
    let file = dir.path().join("m.safetensors");
    let out = run(&[
        "export",
        "--checkpoint",
        run_dir.to_str().unwrap(),
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0x10;
    std::fs::write(&file, &bytes).unwrap();
    assert_one_error_line(&generate(&file, &GREEDY), "sha256");
    std::fs::write(&file, &bytes[..n / 3]).unwrap();
    assert_one_error_line(&generate(&file, &GREEDY), "not a valid model");

    // No tokenizer anywhere: a copy of the checkpoint in a run dir without tokenizer.json or config.toml.
    let bare = dir.path().join("bare");
    let ck_src = run_dir.join("checkpoints/step-00000020");
    let ck_dst = bare.join("checkpoints/step-00000020");
    std::fs::create_dir_all(&ck_dst).unwrap();
    for f in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        std::fs::copy(ck_src.join(f), ck_dst.join(f)).unwrap();
    }
    assert_one_error_line(&generate(&bare, &GREEDY), "no tokenizer.json");

    // A tokenizer with another vocab.
    let corpus = dir.path().join("corpus2.txt");
    data_prep::synth(&corpus, 200, 2).unwrap();
    let data2 = dir.path().join("data2");
    let mut opts = data_prep::BuildOptions::new(vec![corpus], &data2);
    opts.vocab_size = 300;
    data_prep::build(&opts).unwrap();
    std::fs::copy(data2.join("tokenizer.json"), bare.join("tokenizer.json")).unwrap();
    assert_one_error_line(&generate(&bare, &GREEDY), "vocab");

    // Bad flags.
    assert_one_error_line(
        &generate(&run_dir, &["--prompt", "x", "--top-p", "2"]),
        "--top-p",
    );
}
