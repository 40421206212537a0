//! End-to-end: `runner ui --port 0` over a home while a real sweep trains — the JSON endpoints, points
//! arriving while the runs train, tags written by the CLI showing up, nothing written by the dashboard,
//! traversal refused, 404s — and a real headless Chromium drawing the live dashboard and the offline
//! `report --html` page (one series per run shown, no script error).
//!
//! The browser part needs Debian's `chromium` (or BITLLAMA_CHROMIUM=path); `.ci/run` installs it and sets
//! BITLLAMA_BROWSER_TEST=1, which makes its absence a failure instead of a skip.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{ok, runner, Reaped};

/// One raw HTTP/1.1 GET (the path sent exactly as given, `..` and all): status, body.
fn http(addr: &str, method: &str, path: &str, host: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (code, body)
}

fn get(addr: &str, path: &str) -> (u16, String) {
    http(addr, "GET", path, "127.0.0.1")
}

fn get_json(addr: &str, path: &str) -> serde_json::Value {
    let (code, body) = get(addr, path);
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sweep_file(dir: &Path, steps: u64) -> PathBuf {
    let text = format!(
        "name = \"watched <b>&\"\n[data]\ndir = \"{}\"\nsynth_stories = 200\nvocab_size = 300\n\
         [base]\ndim = 16\nn_heads = 2\nttt_mini_batch = 4\nsteps = {steps}\nlog_every = 1\neval_every = 20\neval_batches = 1\n\
         checkpoint_every = 50\nwarmup_steps = 2\n[sweep]\nn_layers = [1, 2]\nlr = [0.003]\n\
         [resources]\ndevices = [\"cpu\"]\nmax_parallel = 2\n",
        dir.join("data").display()
    );
    let p = dir.join("watched.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// Start `runner ui --port 0` and read the address it printed.
fn start_ui(home: &Path) -> (Reaped, String) {
    let mut child = runner(home)
        .args(["ui", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .and_then(|a| a.strip_suffix('/'))
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_string();
    (Reaped(Some(child)), addr)
}

fn files_digest(home: &Path) -> Vec<(String, Vec<u8>)> {
    ["runs.db", "runs.db-wal"]
        .iter()
        .map(|n| {
            (
                n.to_string(),
                std::fs::read(home.join(n)).unwrap_or_default(),
            )
        })
        .collect()
}

/// Chromium, when this machine has it (`None`: skip the browser checks, unless CI asked for them).
fn chromium() -> Option<PathBuf> {
    let found = std::env::var_os("BITLLAMA_CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| {
            ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
        });
    if found.is_none() {
        assert!(
            std::env::var_os("BITLLAMA_BROWSER_TEST").is_none(),
            "BITLLAMA_BROWSER_TEST is set but no chromium was found: `apt-get install chromium` or set BITLLAMA_CHROMIUM"
        );
        eprintln!("skipping the browser checks: no chromium (apt-get install chromium)");
    }
    found
}

/// Load `url` in headless Chromium, let its scripts run (virtual time), and return `<body>`'s data-*
/// attributes the page sets when it has drawn (series count, runs shown, script errors).
fn browser_body(chromium: &Path, url: &str, profile: &Path) -> String {
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1400,1800",
            "--virtual-time-budget=6000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    let start = dom.find("<body").unwrap_or_else(|| {
        panic!(
            "no <body> from chromium: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    dom[start..start + dom[start..].find('>').unwrap()].to_string()
}

fn attr(body: &str, name: &str) -> Option<String> {
    let key = format!("{name}=\"");
    let at = body.find(&key)? + key.len();
    Some(body[at..at + body[at..].find('"')?].to_string())
}

#[test]
fn the_dashboard_follows_a_running_sweep_read_only_and_draws_in_a_browser() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let file = sweep_file(dir.path(), 100_000);
    let mut sweep = Reaped(Some(
        runner(&home)
            .arg("sweep")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    wait_for("runs.db", || home.join("runs.db").is_file());
    // `ls` takes the home's migration lock: past it, the sweep's runner has finished creating the schema
    // (the dashboard opens read-only and refuses a database that is not migrated yet).
    wait_for("the schema", || {
        runner(&home)
            .arg("ls")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let (_ui, addr) = start_ui(&home);

    // The page and its embedded files.
    let (code, page) = get(&addr, "/");
    assert_eq!(code, 200);
    assert!(page.contains("<title>Bit-Llama Lab</title>"), "{page}");
    for asset in [
        "app.js",
        "style.css",
        "uPlot.iife.min.js",
        "uPlot.LICENSE.txt",
    ] {
        assert_eq!(get(&addr, &format!("/assets/{asset}")).0, 200, "{asset}");
    }

    // Both runs are listed (the rows of `report --format json`), and train.
    wait_for("both runs training", || {
        let runs = get_json(&addr, "/api/runs?sweep=s1");
        runs.as_array().unwrap().len() == 2
            && runs
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["step"].as_i64().unwrap_or(0) >= 3)
    });
    let runs = get_json(&addr, "/api/runs");
    assert_eq!(runs[0]["params"]["n_layers"], 1);
    assert!(runs[0]["tags"].as_array().unwrap().is_empty());
    let sweeps = get_json(&addr, "/api/sweeps");
    assert_eq!(sweeps[0]["name"], "watched <b>&", "names arrive as data");

    // Points: columns of equal length; `after` returns only newer points, and new ones arrive while the
    // run trains.
    let m = get_json(&addr, "/api/runs/1/metrics?name=loss");
    let steps: Vec<i64> = serde_json::from_value(m["step"].clone()).unwrap();
    assert!(!steps.is_empty());
    for col in ["tokens", "elapsed_s", "value"] {
        assert_eq!(m[col].as_array().unwrap().len(), steps.len(), "{col}");
    }
    assert!(m["elapsed_s"][0].as_f64().unwrap() > 0.0);
    let last = *steps.last().unwrap();
    wait_for("a newer loss point", || {
        let newer = get_json(
            &addr,
            &format!("/api/runs/1/metrics?name=loss&after={last}"),
        );
        let s: Vec<i64> = serde_json::from_value(newer["step"].clone()).unwrap();
        !s.is_empty() && s.iter().all(|&x| x > last)
    });
    let both = get_json(&addr, "/api/metrics?name=loss&runs=1,2:1");
    assert!(both["1"]["step"][0].as_i64().unwrap() >= 1);
    assert!(both["2"]["step"][0].as_i64().unwrap() > 1);
    let names = get_json(&addr, "/api/metric-names?runs=1,2");
    for n in ["loss", "lr", "elapsed_s", "grad_norm"] {
        assert!(
            names.as_array().unwrap().iter().any(|x| x == n),
            "{n}: {names}"
        );
    }
    let detail = get_json(&addr, "/api/runs/2");
    assert!(detail["config"].as_str().unwrap().contains("n_layers = 2"));
    assert!(detail["events"].as_array().unwrap().len() >= 2);
    assert!(detail["manage"]["rm"].as_str().unwrap().contains("rm 2"));

    // A tag the runner writes (the one writer) shows in the dashboard's next answer.
    let token = get_json(&addr, "/api/state")["token"].clone();
    ok(&runner(&home).args(["tag", "1", "best"]).output().unwrap());
    assert_ne!(get_json(&addr, "/api/state")["token"], token);
    assert_eq!(
        get_json(&addr, "/api/runs?tag=best")
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Errors: unknown ids, malformed queries, unknown routes, other methods, traversal, foreign hosts.
    for (path, want) in [
        ("/api/runs/999", 404),
        ("/api/runs/abc", 404),
        ("/api/runs/999/metrics?name=loss", 404),
        ("/api/runs?sweep=s99", 404),
        ("/api/runs/1/metrics", 400),
        ("/api/metrics?name=loss&runs=x", 400),
        ("/nope", 404),
        ("/api/nope", 404),
        ("/assets/", 404),
        ("/assets/missing.js", 404),
        ("/assets/../runs.db", 404),
        ("/../runs.db", 404),
        ("/assets/..%2fruns.db", 404),
        ("/assets/%2e%2e/%2e%2e/etc/passwd", 404),
        ("/assets/..%2F..%2Fetc%2Fpasswd", 404),
        ("/assets//etc/passwd", 404),
    ] {
        let (code, body) = get(&addr, path);
        assert_eq!(code, want, "{path}: {body}");
        assert!(
            !body.contains("SQLite format") && !body.contains("root:"),
            "{path}"
        );
    }
    assert_eq!(http(&addr, "POST", "/api/runs", "127.0.0.1").0, 405);
    assert_eq!(http(&addr, "DELETE", "/api/runs/1", "127.0.0.1").0, 405);
    assert_eq!(http(&addr, "GET", "/api/runs", "evil.example").0, 403);
    assert_eq!(http(&addr, "GET", "/api/runs", "localhost").0, 200);

    // The browser: the live dashboard draws one curve per run shown, without a script error.
    let chrome = chromium();
    if let Some(chrome) = &chrome {
        let body = browser_body(
            chrome,
            &format!("http://{addr}/"),
            &dir.path().join("profile"),
        );
        assert_eq!(attr(&body, "data-errors").as_deref(), Some("0"), "{body}");
        assert_eq!(attr(&body, "data-series").as_deref(), Some("2"), "{body}");
        assert_eq!(
            attr(&body, "data-runs-shown").as_deref(),
            Some("2"),
            "{body}"
        );
        let run_page = browser_body(
            chrome,
            &format!("http://{addr}/#/run/2"),
            &dir.path().join("profile"),
        );
        assert_eq!(
            attr(&run_page, "data-errors").as_deref(),
            Some("0"),
            "{run_page}"
        );
    }

    // Read-only: with the sweep stopped, every endpoint leaves runs.db and its WAL as they were.
    // SAFETY: kill(2) on the runner this test started.
    unsafe {
        libc::kill(sweep.0.as_ref().unwrap().id() as i32, libc::SIGTERM);
    }
    let _ = sweep.0.take().unwrap().wait();
    let before = files_digest(&home);
    for path in [
        "/",
        "/api/state",
        "/api/sweeps",
        "/api/runs",
        "/api/runs/1",
        "/api/runs/2/metrics?name=val_loss",
        "/api/metrics?name=elapsed_s&runs=1,2",
    ] {
        get(&addr, path);
    }
    assert!(
        files_digest(&home) == before,
        "the dashboard wrote to runs.db"
    );

    // The offline report is the same page with the data inlined, and draws without any server.
    let report = dir.path().join("report.html");
    ok(&runner(&home)
        .args(["report", "s1", "--html"])
        .arg(&report)
        .output()
        .unwrap());
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(html.contains("id=\"inline-data\"") && !html.contains("src=\"assets/"));
    assert!(!html.contains("watched <b>&"), "the sweep name is escaped");
    if let Some(chrome) = &chrome {
        let body = browser_body(
            chrome,
            &format!("file://{}", report.display()),
            &dir.path().join("profile"),
        );
        assert_eq!(attr(&body, "data-errors").as_deref(), Some("0"), "{body}");
        assert_eq!(attr(&body, "data-series").as_deref(), Some("2"), "{body}");
    }

    // Run management: a note, the tag filter, and removing a run (asked first; its rows and folder go).
    let cli = |args: &[&str]| ok(&runner(&home).args(args).output().unwrap());
    cli(&["note", "1", "keep: the baseline"]);
    let listed = cli(&["ls", "--tag", "best"]);
    assert!(
        listed.contains("[best]") && listed.contains("# keep: the baseline"),
        "{listed}"
    );
    assert!(!listed.contains("\n      2 "), "{listed}");
    let out = runner(&home)
        .args(["rm", "2"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--yes"));
    assert!(home.join("run-2").is_dir());
    cli(&["rm", "2", "--yes"]);
    assert!(!home.join("run-2").exists());
    let left = get_json(&addr, "/api/runs");
    assert_eq!(left.as_array().unwrap().len(), 1);
    assert_eq!(left[0]["note"], "keep: the baseline");
    assert_eq!(get(&addr, "/api/runs/2").0, 404);
}

#[test]
fn the_dashboard_refuses_a_missing_home_and_a_taken_port() {
    let dir = tempfile::tempdir().unwrap();
    let out = runner(&dir.path().join("none"))
        .args(["ui", "--port", "0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no runs.db"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let home = dir.path().join("home");
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        runner::store::RunStore::open(&home).await.unwrap();
    });
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = runner(&home)
        .args(["ui", "--port", &port])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is in use"), "{err}");
}

/// `--host localhost` is a name for loopback (resolved, not refused); a malformed query value is a JSON 400
/// like every other API error, and an unknown run a JSON 404.
#[test]
fn the_dashboard_takes_a_host_name_and_answers_bad_queries_in_json() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        runner::store::RunStore::open(&home).await.unwrap();
    });
    let mut child = runner(&home)
        .args(["ui", "--host", "localhost", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ui = Reaped(Some(child));
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .and_then(|a| a.strip_suffix('/'))
        .unwrap_or_else(|| panic!("--host localhost: unexpected first line {line:?}"))
        .to_string();
    assert!(
        addr.starts_with("127.0.0.1:") || addr.starts_with("[::1]:"),
        "{addr}"
    );
    let (code, body) = get(&addr, "/api/runs/1/metrics?name=loss&after=notanumber");
    assert_eq!(code, 400, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{body}"));
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("after")),
        "{v}"
    );
    let (code, body) = get(&addr, "/api/runs/999");
    assert_eq!(code, 404, "{body}");
    assert!(
        serde_json::from_str::<serde_json::Value>(&body).is_ok(),
        "{body}"
    );
    drop(ui);
}

/// The scaling view of an IsoFLOP study (3 sizes × 2 budgets, WSD with forks): its fits over HTTP, and
/// both pictures drawn in Chromium, live and in the offline `report --html` page, without a script error.
#[test]
fn the_scaling_view_draws_an_isoflop_study() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let fpt = common::tiny_flops_per_token(16);
    let file = common::search_file(
        dir.path(),
        "iso",
        1,
        &format!(
            "strategy = \"isoflop\"\nbudgets = [{:e}, {:e}]\nmin_tokens_per_param = 0\ndim = [16, 24, 32]",
            30.0 * 64.0 * fpt,
            60.0 * 64.0 * fpt
        ),
        &[("steps = 1\n", "lr_schedule = \"wsd\"\n")],
        "",
    );
    ok(&runner(&home).arg("sweep").arg(&file).output().unwrap());
    let (_ui, addr) = start_ui(&home);
    let fit = get_json(&addr, "/api/scaling?sweep=s1&group_by=dim");
    assert_eq!(fit["points"].as_array().map(Vec::len), Some(6), "{fit}");
    assert_eq!(fit["groups"].as_array().map(Vec::len), Some(3), "{fit}");
    let (code, _) = get(&addr, "/api/scaling?sweep=7");
    assert_eq!(code, 400);
    let Some(chrome) = chromium() else { return };
    let body = browser_body(
        &chrome,
        &format!("http://{addr}/?sweep=s1"),
        &dir.path().join("profile"),
    );
    assert_eq!(attr(&body, "data-errors").as_deref(), Some("0"), "{body}");
    assert_eq!(
        attr(&body, "data-scaling-points").as_deref(),
        Some("6"),
        "{body}"
    );
    let page = dir.path().join("report.html");
    ok(&runner(&home)
        .args(["report", "s1", "--html"])
        .arg(&page)
        .output()
        .unwrap());
    let body = browser_body(
        &chrome,
        &format!("file://{}", page.display()),
        &dir.path().join("profile2"),
    );
    assert_eq!(attr(&body, "data-errors").as_deref(), Some("0"), "{body}");
    assert_eq!(
        attr(&body, "data-scaling-points").as_deref(),
        Some("6"),
        "{body}"
    );
}
