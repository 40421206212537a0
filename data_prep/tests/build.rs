//! End-to-end tests of `data_prep build` / `tinystories` / `synth` / `verify`, through the
//! library and through the compiled binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use data_prep::corpus::read_stories;
use data_prep::encode::{read_tokens, split_stories};
use data_prep::tokenizer::decode_story;
use data_prep::{BuildOptions, Error, Meta, Split, EOT_ID, EOT_TOKEN, PAD_ID};

const BIN: &str = env!("CARGO_BIN_EXE_data_prep");

fn synth_file(dir: &Path, name: &str, stories: usize, seed: u64) -> PathBuf {
    let p = dir.join(name);
    data_prep::synth(&p, stories, seed).unwrap();
    p
}

fn opts(inputs: Vec<PathBuf>, out: &Path) -> BuildOptions {
    let mut o = BuildOptions::new(inputs, out);
    o.vocab_size = 600;
    o.val_fraction = 0.1;
    o.seed = 3;
    o
}

/// Decodes every story of a split's .bin file.
fn decode_split(dir: &Path, meta: &Meta, split: Split) -> Vec<String> {
    let tok = meta.load_tokenizer(dir).unwrap();
    let tokens = read_tokens(&meta.split_path(dir, split)).unwrap();
    assert_eq!(tokens.last().map(|&t| u32::from(t)), Some(EOT_ID));
    split_stories(&tokens)
        .iter()
        .map(|ids| decode_story(&tok, ids).unwrap())
        .collect()
}

fn check_counts(dir: &Path, meta: &Meta) {
    for split in Split::ALL {
        let stats = meta.split(split);
        let path = meta.split_path(dir, split);
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(stats.tokens * 2, len, "{split}: tokens*2 == file length");
        let tokens = read_tokens(&path).unwrap();
        assert!(tokens.iter().all(|&t| (t as usize) < meta.vocab_size));
        let eots = tokens.iter().filter(|&&t| u32::from(t) == EOT_ID).count() as u64;
        assert_eq!(eots, stats.stories, "{split}: one end-of-text per story");
        assert!(!tokens.iter().any(|&t| u32::from(t) == PAD_ID));
        assert_eq!(data_prep::fsutil::sha256_file(&path).unwrap(), stats.sha256);
    }
}

#[test]
fn library_build_round_trips_both_splits() {
    let tmp = tempfile::tempdir().unwrap();
    let input = synth_file(tmp.path(), "stories.txt", 300, 11);
    let out = tmp.path().join("build");
    let o = opts(vec![input.clone()], &out);
    let meta = data_prep::build(&o).unwrap();

    assert_eq!(Meta::load(&out).unwrap(), meta);
    assert_eq!((meta.eot_id, meta.pad_id), (0, 1));
    assert!(meta.vocab_size > 258 && meta.vocab_size <= 600);
    assert_eq!(meta.train.stories + meta.val.stories, 300);
    assert!(meta.val.stories > 0 && meta.train.stories > meta.val.stories);
    assert_eq!(
        meta.inputs[0].sha256,
        data_prep::fsutil::sha256_file(&input).unwrap()
    );
    assert_eq!(
        meta.tokenizer.sha256,
        data_prep::fsutil::sha256_file(&out.join("tokenizer.json")).unwrap()
    );
    check_counts(&out, &meta);

    // Decoding reproduces the split's stories exactly, in order.
    let corpus = o.corpus();
    for split in Split::ALL {
        let want = corpus.collect_split(split).unwrap();
        assert_eq!(decode_split(&out, &meta, split), want, "{split}");
        let bytes: u64 = want.iter().map(|s| s.len() as u64).sum();
        assert_eq!(meta.split(split).bytes, bytes, "{split}: story bytes");
    }

    // No temporary files are left behind.
    for entry in std::fs::read_dir(&out).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(!name.ends_with(".tmp"), "{name}");
    }

    let report = data_prep::verify(&out, &Default::default()).unwrap();
    assert!(report.inputs_compared);
}

#[test]
fn val_input_file_is_the_val_split_and_builds_are_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let train = synth_file(tmp.path(), "train.txt", 250, 1);
    let valid = synth_file(tmp.path(), "valid.txt", 40, 2);
    let mut o = opts(vec![train.clone()], &tmp.path().join("a"));
    o.val_inputs = vec![valid.clone()];
    let a = data_prep::build(&o).unwrap();
    assert_eq!(a.val_source, data_prep::ValSource::ValInput);
    assert_eq!(a.train.stories, 250);
    assert_eq!(
        decode_split(&o.out, &a, Split::Val),
        read_stories(&valid, EOT_TOKEN).unwrap()
    );
    assert_eq!(
        decode_split(&o.out, &a, Split::Train),
        read_stories(&train, EOT_TOKEN).unwrap()
    );

    // The same inputs and settings in another folder give identical files.
    o.out = tmp.path().join("b");
    let b = data_prep::build(&o).unwrap();
    assert_eq!(a.tokenizer.sha256, b.tokenizer.sha256);
    assert_eq!(a.train, b.train);
    assert_eq!(a.val, b.val);
    // Seed and val fraction play no part with --val-input: the build is still up to date.
    o.seed += 1;
    o.val_fraction = 0.3;
    assert_eq!(data_prep::build(&o).unwrap().train, b.train);
}

#[test]
fn concurrent_builds_into_one_folder_take_turns() {
    let tmp = tempfile::tempdir().unwrap();
    let input = synth_file(tmp.path(), "s.txt", 300, 9);
    let o = opts(vec![input], &tmp.path().join("o"));
    let metas: Vec<Meta> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..3)
            .map(|_| sc.spawn(|| data_prep::build(&o).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(metas.iter().all(|m| *m == metas[0]));
    check_counts(&o.out, &metas[0]);
    data_prep::verify(&o.out, &Default::default()).unwrap();
}

#[test]
fn rebuild_up_to_date_different_build_refused_force_overwrites() {
    let tmp = tempfile::tempdir().unwrap();
    let input = synth_file(tmp.path(), "s.txt", 200, 5);
    let out = tmp.path().join("o");
    let mut o = opts(vec![input.clone()], &out);
    let first = data_prep::build(&o).unwrap();
    let mtime = |p: PathBuf| std::fs::metadata(p).unwrap().modified().unwrap();
    let before = mtime(out.join("train.bin"));
    assert_eq!(
        data_prep::build(&o).unwrap(),
        first,
        "identical rebuild is up to date"
    );
    assert_eq!(
        mtime(out.join("train.bin")),
        before,
        "up to date: nothing rewritten"
    );

    o.vocab_size = 700;
    let err = data_prep::build(&o).unwrap_err();
    assert!(matches!(err, Error::DifferentBuild { .. }), "{err}");
    assert!(err.to_string().contains("--force"));
    assert_eq!(
        Meta::load(&out).unwrap(),
        first,
        "refusal leaves the old build intact"
    );

    // Other inputs with the same settings are refused too.
    o.vocab_size = 600;
    o.inputs = vec![synth_file(tmp.path(), "t.txt", 200, 6)];
    let err = data_prep::build(&o).unwrap_err();
    assert!(err.to_string().contains("--input files differ"), "{err}");

    o.force = true;
    let forced = data_prep::build(&o).unwrap();
    assert_ne!(forced.inputs[0].sha256, first.inputs[0].sha256);
    check_counts(&out, &forced);
}

#[test]
fn verify_detects_a_corrupted_token_file() {
    let tmp = tempfile::tempdir().unwrap();
    let input = synth_file(tmp.path(), "s.txt", 120, 8);
    let out = tmp.path().join("o");
    data_prep::build(&opts(vec![input.clone()], &out)).unwrap();
    assert!(
        data_prep::verify(&out, &Default::default())
            .unwrap()
            .inputs_compared
    );
    // An input edited after the build: the build is still checked, on its own.
    let mut text = std::fs::read(&input).unwrap();
    text.extend_from_slice(b"one more story\n<|endoftext|>\n");
    std::fs::write(&input, text).unwrap();
    let report = data_prep::verify(&out, &Default::default()).unwrap();
    assert!(!report.inputs_compared);
    assert_eq!(report.input_changed.as_deref(), Some(input.as_path()));

    let path = out.join("val.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[2] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let err = data_prep::verify(&out, &Default::default()).unwrap_err();
    assert!(matches!(err, Error::Verify { .. }), "{err}");

    std::fs::remove_file(out.join("tokenizer.json")).unwrap();
    let err = data_prep::verify(&out, &Default::default()).unwrap_err();
    assert!(
        matches!(err, Error::Verify { .. }) && err.to_string().contains("missing"),
        "{err}"
    );
}

// ---------------------------------------------------------------- download

/// A one-thread HTTP/1.1 server for a few in-memory files, honouring `Range: bytes=N-`; a `HEAD`
/// gets a redirect carrying the file's announced SHA-256 and size, as the Hugging Face hub sends.
/// Returns its base URL and a log of the GET requests (path, range start).
type RequestLog = std::sync::Arc<std::sync::Mutex<Vec<(String, u64)>>>;

/// (name, body, announced sha256)
type Served = (String, Vec<u8>, Option<String>);

fn announced(name: &str, body: Vec<u8>) -> Served {
    use sha2::Digest;
    let sha = format!("{:x}", sha2::Sha256::digest(&body));
    (name.to_owned(), body, Some(sha))
}

fn serve(files: Vec<Served>) -> (String, RequestLog) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            let method = request.split_whitespace().next().unwrap_or("").to_owned();
            let path = request.split_whitespace().nth(1).unwrap_or("").to_owned();
            let mut start = 0u64;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line.trim().is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    start = v.trim().trim_end_matches('-').parse().unwrap();
                }
            }
            let Some((_, body, sha)) = files.iter().find(|(n, ..)| format!("/{n}") == path) else {
                let _ = stream.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            };
            if method == "HEAD" {
                let linked = sha
                    .as_ref()
                    .map(|sha| {
                        format!(
                            "X-Linked-Etag: \"{sha}\"\r\nX-Linked-Size: {}\r\n",
                            body.len()
                        )
                    })
                    .unwrap_or_default();
                let _ = stream.write_all(
                    format!("HTTP/1.1 302 Found\r\nLocation: /storage{path}\r\n{linked}Content-Length: 0\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                );
                continue;
            }
            log2.lock().unwrap().push((path.clone(), start));
            let body = &body[start as usize..];
            let head = if start > 0 {
                format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nConnection: close\r\n\r\n",
                    body.len(),
                    start as usize + body.len() - 1,
                    start as usize + body.len()
                )
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
            };
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(body);
        }
    });
    (base, log)
}

#[test]
fn tinystories_downloads_resumes_and_builds_with_official_val() {
    let tmp = tempfile::tempdir().unwrap();
    let train = std::fs::read(synth_file(tmp.path(), "t.txt", 200, 21)).unwrap();
    let valid = std::fs::read(synth_file(tmp.path(), "v.txt", 30, 22)).unwrap();
    let (train_name, valid_name) = data_prep::Variant::V1.files();
    let (base, log) = serve(vec![
        announced(train_name, train.clone()),
        announced(valid_name, valid.clone()),
    ]);
    let out = tmp.path().join("ts");
    // A previous, interrupted download left the first half of the train file.
    std::fs::create_dir_all(out.join("raw")).unwrap();
    let half = train.len() / 2;
    std::fs::write(
        out.join("raw").join(format!("{train_name}.part")),
        &train[..half],
    )
    .unwrap();

    let mut o = data_prep::TinyStoriesOptions::new(&out);
    o.variant = data_prep::Variant::V1;
    o.base_url = Some(base);
    o.build.vocab_size = 500;
    let meta = data_prep::tinystories(&o).unwrap();

    assert_eq!(
        std::fs::read(out.join("raw").join(train_name)).unwrap(),
        train
    );
    assert_eq!(
        std::fs::read(out.join("raw").join(valid_name)).unwrap(),
        valid
    );
    assert!(!out.join("raw").join(format!("{train_name}.part")).exists());
    let requests = log.lock().unwrap().clone();
    assert!(
        requests.contains(&(format!("/{train_name}"), half as u64)),
        "resumed: {requests:?}"
    );
    assert_eq!(meta.val_source, data_prep::ValSource::ValInput);
    assert_eq!((meta.train.stories, meta.val.stories), (200, 30));
    assert_eq!(
        meta.val_inputs[0].sha256,
        data_prep::fsutil::sha256_file(&out.join("raw").join(valid_name)).unwrap()
    );
    check_counts(&out, &meta);

    // Everything is present now: a second run downloads nothing and is up to date.
    assert_eq!(data_prep::tinystories(&o).unwrap(), meta);
    assert_eq!(
        log.lock().unwrap().len(),
        requests.len(),
        "nothing downloaded again"
    );
}

#[test]
fn downloads_are_checked_against_the_announced_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let good = b"first story\n<|endoftext|>\nsecond story\n<|endoftext|>\n".to_vec();
    let mut bad = good.clone();
    bad[3] ^= 1;
    let (_, _, good_sha) = announced("x", good.clone());
    let (base, log) = serve(vec![
        announced("ok.txt", good.clone()),
        // Served bytes that are not what the hub announces (a corrupting proxy, a truncated file).
        ("bad.txt".into(), bad, good_sha),
        // A server that announces nothing this time.
        ("quiet.txt".into(), good.clone(), None),
    ]);
    let agent = data_prep::download::agent();
    let raw = tmp.path();

    // A .part begun for another version of the file is started over, not continued.
    std::fs::write(raw.join("ok.txt.part"), b"old version's first ha").unwrap();
    std::fs::write(raw.join("ok.txt.part.sha256"), "0".repeat(64)).unwrap();
    let url = format!("{base}/ok.txt");
    data_prep::download::download(&agent, &url, &raw.join("ok.txt"), false).unwrap();
    assert_eq!(std::fs::read(raw.join("ok.txt")).unwrap(), good);
    assert!(!raw.join("ok.txt.part.sha256").exists());
    assert_eq!(
        log.lock().unwrap().last().unwrap(),
        &("/ok.txt".to_owned(), 0)
    );

    let url = format!("{base}/bad.txt");
    let err = data_prep::download::download(&agent, &url, &raw.join("bad.txt"), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("corrupt") && err.contains("sha256"), "{err}");
    assert!(!err.contains('\n'));
    assert!(!raw.join("bad.txt").exists() && !raw.join("bad.txt.part").exists());

    // A .part begun for another version, resumed while the server announces nothing: checked against
    // the version it was begun for, so the splice is caught.
    std::fs::write(raw.join("quiet.txt.part"), b"first st").unwrap();
    std::fs::write(raw.join("quiet.txt.part.sha256"), "1".repeat(64)).unwrap();
    let url = format!("{base}/quiet.txt");
    let err = data_prep::download::download(&agent, &url, &raw.join("quiet.txt"), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("corrupt"), "{err}");
    // ... and the rerun, with no sidecar left, fetches it whole.
    data_prep::download::download(&agent, &url, &raw.join("quiet.txt"), false).unwrap();
    assert_eq!(std::fs::read(raw.join("quiet.txt")).unwrap(), good);
}

// ---------------------------------------------------------------- command line

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run data_prep")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a bad-input failure: exit code 1 and a one-line `error: ...` naming the problem.
fn assert_fails(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no `error:` line in {err}"));
    for n in needles {
        assert!(line.contains(n), "{n:?} not in {line:?}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn cli_synth_build_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.txt");
    let b = tmp.path().join("b.txt");
    for p in [&a, &b] {
        let o = run(&["synth", "--out", s(p), "--stories", "150", "--seed", "4"]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());

    let out = tmp.path().join("o");
    let o = run(&[
        "build",
        "--input",
        s(&a),
        "--out",
        s(&out),
        "--vocab-size",
        "500",
        "--val-fraction",
        "0.2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("vocab_size:"), "{stdout}");
    let meta = Meta::load(&out).unwrap();
    check_counts(&out, &meta);

    let o = run(&["verify", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("decodes back to its input story exactly"));

    // Same command again: up to date.
    let o = run(&[
        "build",
        "--input",
        s(&a),
        "--out",
        s(&out),
        "--vocab-size",
        "500",
        "--val-fraction",
        "0.2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("up to date"), "{}", stderr(&o));
}

#[test]
fn cli_bad_inputs_fail_with_clear_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let good = synth_file(dir, "good.txt", 60, 1);
    let out = dir.join("out");
    let out_s = s(&out);

    let missing = dir.join("missing.txt");
    let o = run(&["build", "--input", s(&missing), "--out", out_s]);
    assert_fails(&o, &["cannot read input", "missing.txt"]);

    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let o = run(&["build", "--input", s(&empty), "--out", out_s]);
    assert_fails(&o, &["empty.txt", "is empty"]);

    let nosep = dir.join("nosep.txt");
    std::fs::write(&nosep, "Once upon a time.\n---\nAnother story.\n").unwrap();
    let o = run(&["build", "--input", s(&nosep), "--out", out_s]);
    assert_fails(&o, &["no separator lines", "--separator"]);
    // ... and --separator fixes it.
    let sep_out = dir.join("sep_out");
    let o = run(&[
        "build",
        "--input",
        s(&nosep),
        "--out",
        s(&sep_out),
        "--separator",
        "---",
        "--val-fraction",
        "0.5",
        "--vocab-size",
        "300",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        Meta::load(&sep_out).unwrap().train.stories + Meta::load(&sep_out).unwrap().val.stories,
        2
    );

    let o = run(&[
        "build",
        "--input",
        s(&good),
        "--out",
        out_s,
        "--vocab-size",
        "70000",
    ]);
    assert_fails(&o, &["vocab size 70000", "65536", "u16"]);
    let o = run(&[
        "build",
        "--input",
        s(&good),
        "--out",
        out_s,
        "--vocab-size",
        "100",
    ]);
    assert_fails(&o, &["vocab size 100", "258"]);

    let o = run(&[
        "build",
        "--input",
        s(&good),
        "--out",
        out_s,
        "--val-fraction",
        "0",
    ]);
    assert_fails(
        &o,
        &["val split would be empty", "--val-fraction", "--val-input"],
    );
    let o = run(&[
        "build",
        "--input",
        s(&good),
        "--out",
        out_s,
        "--val-fraction",
        "1",
    ]);
    assert_fails(&o, &["train split would be empty"]);
    let only_seps = dir.join("seps.txt");
    std::fs::write(&only_seps, "<|endoftext|>\n\n<|endoftext|>\n").unwrap();
    let o = run(&[
        "build",
        "--input",
        s(&only_seps),
        "--val-input",
        s(&good),
        "--out",
        out_s,
    ]);
    assert_fails(&o, &["train split would be empty", "hold no stories"]);
    let o = run(&[
        "build",
        "--input",
        s(&good),
        "--val-input",
        s(&only_seps),
        "--out",
        out_s,
    ]);
    assert_fails(&o, &["--val-input files hold no stories"]);
    assert!(
        !out.join("meta.json").exists(),
        "failed builds write no meta.json"
    );

    // A folder holding a different build is refused without --force.
    let o = run(&[
        "build",
        "--input",
        s(&good),
        "--out",
        out_s,
        "--vocab-size",
        "400",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&[
        "build",
        "--input",
        s(&good),
        "--out",
        out_s,
        "--vocab-size",
        "450",
    ]);
    assert_fails(
        &o,
        &["already holds a different build", "vocab size", "--force"],
    );
    let o = run(&[
        "build",
        "--input",
        s(&good),
        "--out",
        out_s,
        "--vocab-size",
        "450",
        "--force",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        Meta::load(&out)
            .unwrap()
            .tokenizer
            .settings
            .vocab_size_requested,
        450
    );
}

#[test]
fn cli_tinystories_offline_fails_fast_naming_build() {
    let tmp = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let o = Command::new(BIN)
        .args([
            "tinystories",
            "--out",
            s(&tmp.path().join("ts")),
            "--vocab-size",
            "512",
        ])
        .env("DATA_PREP_HF_BASE", "http://127.0.0.1:9")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .output()
        .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    assert_fails(
        &o,
        &[
            "could not download",
            "127.0.0.1:9",
            "data_prep build --input",
        ],
    );
    assert!(!tmp.path().join("ts/meta.json").exists());
}

#[test]
fn cli_help_explains_every_subcommand() {
    for (sub, needle) in [
        ("build", "--val-fraction"),
        ("tinystories", "--variant"),
        ("synth", "--stories"),
        ("verify", "meta.json"),
    ] {
        let o = run(&[sub, "--help"]);
        assert!(o.status.success());
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains(needle), "{sub} --help lacks {needle}: {text}");
        assert!(text.lines().count() > 8, "{sub} --help is too short");
    }
}
