//! The `runner` command line: argument parsing in one place; the work is in the library modules.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use engine::events::Event;

use crate::exec::{self, EngineCommand, Summary};
use crate::ingest;
use crate::report::{self, ReportRow};
use crate::search::{Sampler, SweepSearch};
use crate::spec::{self, Strategy, Sweep, SweepFile};
use crate::store::{Id, NewRun, RunStatus, RunStore};
use std::collections::HashMap;

#[derive(Parser)]
#[command(
    name = "runner",
    version,
    about = "Hyperparameter sweeps over Bit-Llama runs, tracked in SQLite",
    long_about = "Hyperparameter sweeps over Bit-Llama runs: expands sweep files into runs, launches one `engine train` \
                  process per run on free devices (or submits one sbatch job per run with [resources] backend = \"slurm\"), \
                  records metrics, checkpoints and status in HOME/runs.db (SQLite), resumes interrupted work and reports results."
)]
pub struct Cli {
    /// Folder holding runs.db and one folder per run.
    #[arg(long, global = true, env = "RUNNER_HOME", default_value = "runs")]
    home: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Csv,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Expand sweep files into runs, record them, run them all over the free devices (or as Slurm jobs), and
    /// print the report. Several files share one queue. Ctrl-C asks running engines to checkpoint and stop
    /// (with Slurm: asks whether to scancel the jobs); `runner resume` continues. Exits non-zero when any run
    /// failed.
    Sweep {
        /// Sweep TOML files (e.g. experiments/*.toml).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Print the expanded runs with parameter counts and memory estimates; launch nothing.
        #[arg(long)]
        dry_run: bool,
        /// Override a sweep-file value, e.g. --set resources.max_parallel=4 or --set base.steps=100
        /// (applied after the file and RUNNER_* environment variables; repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Continue a run (ID like 7) from its latest checkpoint, or a sweep (ID like s3): its interrupted and
    /// failed runs resume and never-started ones launch; with early stopping the search continues (paused
    /// runs promoted by the rule), and a TPE sweep samples its remaining trials. Right after a killed
    /// runner it waits for that runner's engines to finish their checkpoints. Completed runs are not rerun;
    /// a paused or pruned run resumed on its own (ID like 7) trains to its full length.
    Resume {
        /// A run id (7) or a sweep id (s3), as `runner ls` shows them.
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Compare runs: one row per run with swept parameters, steps, final/best val loss, bpb, tokens/s, wall
    /// time and the latest checkpoint.
    Report {
        /// Sweeps (s3) and runs (7) to compare, in any mix (`runner report s1 s4 12`); all runs by default.
        #[arg(value_name = "ID")]
        ids: Vec<String>,
        /// Column to sort by: id, val_loss, best_val_loss, val_bpb, tokens_per_s, wall_s, or any run setting
        /// (n_layers, lr, ...); -KEY or KEY:desc sorts descending.
        #[arg(long, default_value = "id", allow_hyphen_values = true)]
        sort: String,
        /// table (aligned text), csv, or json (one object per run, every column).
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Also write the dashboard (`runner ui`) as one self-contained HTML file with these runs' data
        /// inlined: curves, parallel coordinates, importance, run pages; opens offline, no server.
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
    },
    /// Fit scaling laws to the completed runs of sweeps (an IsoFLOP study: `strategy = "isoflop"`):
    /// approach 2 (per budget a parabola of final val loss in log N → N_opt(C), D_opt(C), then
    /// N_opt ∝ C^a, D_opt ∝ C^b) and approach 3 (L(N, D) = E + A/N^α + B/D^β, Huber on log loss, L-BFGS
    /// from a grid of starts), with bootstrap intervals. N: parameters outside the embedding; D: tokens;
    /// C: training FLOPs.
    Scaling {
        /// Sweeps (s3) whose completed runs are fitted together.
        #[arg(required = true, value_name = "SWEEP")]
        ids: Vec<String>,
        /// Fit each value of this run setting separately and side by side (weights, mixer, ttt_backbone, ...).
        #[arg(long, value_name = "KEY")]
        group_by: Option<String>,
        /// Predict the compute-optimal N, D and loss (with its interval) at this many training FLOPs.
        #[arg(long, value_name = "FLOPS")]
        predict: Option<f64>,
        /// Bootstrap resamples for the intervals.
        #[arg(long, default_value_t = 200)]
        resamples: usize,
        /// table (aligned text) or json.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// List sweeps and runs with their status, tags and notes.
    Ls {
        /// Only runs with this tag (`runner tag`).
        #[arg(long, value_name = "TAG")]
        tag: Option<String>,
    },
    /// Serve a live dashboard of the home's runs in the browser: sortable runs table, curves of any metric
    /// by step, tokens or wall time (hover, legend toggling, smoothing, log scale), parallel coordinates,
    /// parameter importance and run pages. Reads runs.db read-only while sweeps run in other processes;
    /// open the printed address. Ctrl-C stops it.
    Ui {
        /// Address to listen on. The default keeps the dashboard to this machine; another address lets
        /// anyone who reaches it read every run (a warning says so).
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Port (0: any free one; the address is printed).
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// Tag a run (`runner ls --tag T` and the dashboard filter by tags).
    Tag {
        /// A run id (7), as `runner ls` shows them.
        #[arg(value_name = "ID")]
        id: String,
        /// Tags to add (letters, digits, - _ . : /).
        #[arg(required = true, value_name = "TAG")]
        tags: Vec<String>,
        /// Take these tags off instead.
        #[arg(long)]
        remove: bool,
    },
    /// Set a run's note (an empty text clears it).
    Note {
        /// A run id (7), as `runner ls` shows them.
        #[arg(value_name = "ID")]
        id: String,
        /// The note, e.g. "baseline for the paper".
        #[arg(value_name = "TEXT")]
        text: String,
    },
    /// Remove runs: their rows in runs.db and their run folders (checkpoints included), after asking. A
    /// sweep id (s3) removes all its runs and the sweep. Running runs are never removed.
    Rm {
        /// Run ids (7) or sweep ids (s3).
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
        /// Do not ask (needed when stdin is not a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Show a run (config, status events, checkpoints, last metrics, why it failed) or a sweep's runs.
    Show {
        /// A run id (7) or a sweep id (s3), as `runner ls` shows them.
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Benchmark ingestion: synthetic engine streams through the real parse + SQLite path. Leaves the DB in
    /// --home so `runner report` can be timed on it.
    BenchIngest {
        /// Simulated runs, ingested at once.
        #[arg(long, default_value_t = 100)]
        runs: usize,
        /// Step events per run.
        #[arg(long, default_value_t = 1000)]
        steps: usize,
        /// Metrics per step event (at least 4: loss, lr, tokens_per_s, grad_norm).
        #[arg(long, default_value_t = 4)]
        metrics: usize,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Benchmark the sweep samplers on synthetic objectives (log-lr bowl, Branin, Hartmann-6), no training:
    /// prints one JSON line per objective and sampler with the best value found after each budget, per
    /// seed (runner/bench/tpe_vs_optuna.sh sets them beside Optuna's).
    BenchSampler {
        /// Samplers to run: tpe, random.
        #[arg(long, value_delimiter = ',', default_value = "tpe,random")]
        samplers: Vec<String>,
        /// Trial budgets to report.
        #[arg(long, value_delimiter = ',', default_value = "20,40,80")]
        budgets: Vec<usize>,
        /// Seeds per objective and sampler.
        #[arg(long, default_value_t = 30)]
        seeds: u64,
    },
    /// The embedded engine (`runner engine train ...`), used to launch runs when RUNNER_ENGINE is not set.
    #[command(hide = true, disable_help_flag = true)]
    Engine {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The embedded engine runs without a tokio runtime and with the engine's own CLI.
    if args.get(1).is_some_and(|a| a == "engine") {
        let mut engine_args = vec![std::ffi::OsString::from("engine")];
        engine_args.extend(args[2..].iter().cloned());
        return engine::cli::run_from(engine_args);
    }
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,sqlx=error".into()),
        )
        .with_target(false)
        .try_init();
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Ls { .. } | Command::Show { .. } | Command::Report { .. }
    ) {
        // Listings end quietly when their reader does (`runner ls | head`), as `cat` does, instead of
        // panicking on the broken pipe. Sweeps keep ignoring SIGPIPE: they supervise engines.
        // SAFETY: restoring a default signal disposition before any other thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let home = cli.home.clone();
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "error: {}{}{}",
                engine::error_line(&e),
                full_disk_hint(&home),
                read_only_hint(&e, &home)
            );
            ExitCode::FAILURE
        }
    }
}

/// Bytes free to unprivileged users on the filesystem holding `path`.
fn free_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs(3) fills the struct it is given; the path is a valid C string.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut st) == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
    }
}

/// SQLite says "attempt to write a readonly database" without naming it: name the file and what to do.
fn read_only_hint(e: &anyhow::Error, home: &Path) -> String {
    if e.chain()
        .any(|c| c.to_string().contains("readonly database"))
    {
        format!(
            " ({} or its folder is read-only to this user: the runner records every command there; make it writable or pass another --home)",
            home.join("runs.db").display()
        )
    } else {
        String::new()
    }
}

/// A failing SQLite write on a full disk may say "locked" rather than "full": name the real cause when the
/// home's filesystem is (nearly) out of space.
fn full_disk_hint(home: &Path) -> String {
    match free_bytes(home) {
        Some(free) if free < 8 << 20 => format!(
            " (the disk holding {} has only {} KiB free: free space there, then `runner resume`)",
            home.display(),
            free >> 10
        ),
        _ => String::new(),
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Sweep {
            files,
            dry_run,
            sets,
        } => sweep(&cli.home, &files, dry_run, &sets).await,
        Command::Resume { id } => resume(&cli.home, &id).await,
        Command::Report {
            ids,
            sort,
            format,
            html,
        } => {
            let store = open_existing(&cli.home).await?;
            let ids = ids
                .iter()
                .map(|s| s.parse::<Id>())
                .collect::<Result<Vec<_>>>()?;
            report_runs(&store, &ids, &sort, format, html.as_deref()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ls { tag } => ls(&cli.home, tag.as_deref()).await,
        Command::Scaling {
            ids,
            group_by,
            predict,
            resamples,
            format,
        } => {
            scaling(
                &cli.home,
                &ids,
                group_by.as_deref(),
                predict,
                resamples,
                format,
            )
            .await
        }
        Command::Ui { host, port } => {
            crate::ui::serve(&cli.home, &host, port).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Tag { id, tags, remove } => {
            let store = open_existing(&cli.home).await?;
            let id = run_id(&id)?;
            store.tag(id, &tags, remove).await?;
            let now = store.annotations().await?.remove(&id).unwrap_or_default().0;
            eprintln!("run {id}: tags [{}]", now.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        Command::Note { id, text } => {
            let store = open_existing(&cli.home).await?;
            let id = run_id(&id)?;
            store.set_note(id, &text).await?;
            eprintln!(
                "run {id}: note {}",
                if text.trim().is_empty() {
                    "cleared"
                } else {
                    "set"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Rm { ids, yes } => rm(&cli.home, &ids, yes).await,
        Command::Show { id } => show(&cli.home, &id).await,
        Command::BenchIngest {
            runs,
            steps,
            metrics,
            json,
        } => bench_ingest(&cli.home, runs, steps, metrics, json).await,
        Command::BenchSampler {
            samplers,
            budgets,
            seeds,
        } => {
            let trials = budgets.iter().copied().max().unwrap_or(0);
            for obj in crate::bench_sampler::objectives() {
                for sampler in &samplers {
                    let best: Vec<Vec<f64>> = (0..seeds)
                        .map(|seed| {
                            let curve =
                                crate::bench_sampler::best_curve(&obj, sampler, trials, seed);
                            budgets.iter().map(|b| curve[b - 1]).collect()
                        })
                        .collect();
                    out(format_args!(
                        "{}\n",
                        serde_json::json!({"who": "ours", "objective": obj.name, "sampler": sampler,
                            "budgets": budgets, "best": best})
                    ));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Engine { .. } => unreachable!("handled before parsing"),
    }
}

/// Open an existing home. Runs left `running` by a runner that is gone (and whose engine is gone too)
/// become `interrupted` here, so `ls`, `show` and `report` never show dead runs as running.
async fn open_existing(home: &Path) -> Result<RunStore> {
    crate::store::require_db(home)?;
    let store = RunStore::open(home).await?;
    report_recovered(&store).await?;
    Ok(store)
}

async fn report_recovered(store: &RunStore) -> Result<()> {
    let recovered = store.recover_orphans().await?;
    if !recovered.is_empty() {
        eprintln!("marked runs {recovered:?} interrupted (their processes are gone); `runner resume` continues them");
    }
    Ok(())
}

/// The report of the runs `ids` name (sweeps and runs, each run once), or of every run when `ids` is empty.
async fn report_runs(
    store: &RunStore,
    ids: &[Id],
    sort: &str,
    format: Format,
    html: Option<&Path>,
) -> Result<()> {
    let mut picked = std::collections::BTreeMap::new();
    if ids.is_empty() {
        picked.extend(store.runs(None).await?.into_iter().map(|r| (r.id, r)));
    }
    for id in ids {
        match id {
            Id::Sweep(s) => {
                let s = store.sweep(*s).await?.id;
                picked.extend(store.runs(Some(s)).await?.into_iter().map(|r| (r.id, r)));
            }
            Id::Run(r) => {
                picked.insert(*r, store.run(*r).await?);
            }
        }
    }
    let runs: Vec<_> = picked.into_values().collect();
    let mut rows: Vec<ReportRow> = report::rows(store, &runs).await?;
    report::sort_rows(&mut rows, sort)?;
    // The page first: the table may go to a reader that stops early (`| head`).
    if let Some(path) = html {
        refuse_home_db(&store.home, path)?;
        let title = match ids {
            [] => "all runs".to_string(),
            [Id::Sweep(s)] => format!("sweep s{s}: {}", store.sweep(*s).await?.name),
            _ => {
                let named: Vec<String> = ids.iter().map(Id::to_string).collect();
                format!("runs of {}", named.join(" "))
            }
        };
        let data = crate::ui::api::snapshot(store, rows.clone(), &title).await?;
        let page = crate::ui::offline_page(&data);
        std::fs::write(path, page).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    // Which unit ranked runs that early stopping paused or pruned.
    let mut notes = Vec::new();
    for sweep in rows
        .iter()
        .map(|r| r.sweep_id.clone())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let Ok(id) = sweep.trim_start_matches('s').parse::<i64>() else {
            continue;
        };
        let spec: Option<SweepFile> = serde_json::from_str(&store.sweep_spec(id).await?).ok();
        if let Some(es) = spec.map(|s| s.early_stop).filter(|e| e.enabled()) {
            notes.push(format!("{sweep}: early stopping: {}", es.describe()));
        }
    }
    match format {
        Format::Table => {
            out(format_args!("{}", report::table(&rows)));
            for n in &notes {
                out(format_args!("{n}\n"));
            }
        }
        Format::Csv => out(format_args!("{}", report::csv(&rows))),
        Format::Json => out(format_args!("{}\n", serde_json::to_string_pretty(&rows)?)),
    }
    Ok(())
}

/// `report --html FILE` must never write over the home's database (or its WAL and shared-memory files):
/// the paths are compared after resolving links and `..`, the file's folder canonical, its name as given.
fn refuse_home_db(home: &Path, path: &Path) -> Result<()> {
    let canonical = |p: &Path| -> Option<PathBuf> {
        let name = p.file_name()?;
        let dir = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // An existing file (or a link to one) resolves fully; a new one by its folder.
        std::fs::canonicalize(p)
            .ok()
            .or_else(|| Some(std::fs::canonicalize(dir).ok()?.join(name)))
    };
    let Some(target) = canonical(path) else {
        return Ok(());
    };
    for name in ["runs.db", "runs.db-wal", "runs.db-shm"] {
        if canonical(&home.join(name)).is_some_and(|db| db == target) {
            bail!(
                "--html {} is the runner's database ({}): writing the report there would destroy every run's history; pick another file, e.g. --html report.html",
                path.display(),
                home.join(name).display()
            );
        }
    }
    Ok(())
}

fn exit_for(summary: &Summary) -> ExitCode {
    if summary.failed > 0 {
        ExitCode::FAILURE
    } else if summary.interrupted > 0 {
        ExitCode::from(engine::events::EXIT_INTERRUPTED as u8)
    } else {
        ExitCode::SUCCESS
    }
}

fn print_summary(s: &Summary) {
    eprintln!(
        "{} completed, {} failed, {} interrupted, {} skipped (memory), {} not started{}",
        s.completed,
        s.failed,
        s.interrupted,
        s.skipped_oom,
        s.left_queued,
        if s.pruned + s.paused > 0 {
            format!(
                ", {} pruned by early stopping, {} paused (`runner resume` continues the search)",
                s.pruned, s.paused
            )
        } else {
            String::new()
        }
    );
}

async fn sweep(home: &Path, files: &[PathBuf], dry_run: bool, sets: &[String]) -> Result<ExitCode> {
    // Validate every file before anything launches.
    exec::check_engine_env()?;
    let mut sweeps = Vec::new();
    for file in files {
        let spec = SweepFile::load_with(file, sets)?;
        let vocab = spec::ensure_data(file, &spec.data)?;
        sweeps.push(Sweep::from_spec(file, spec, vocab)?);
    }
    // One queue, one set of devices: the files must agree on [resources].
    let resources = &sweeps[0].spec.resources;
    for s in &sweeps[1..] {
        if serde_json::to_value(&s.spec.resources)? != serde_json::to_value(resources)? {
            bail!(
                "{} and {} ask for different [resources]: sweep them with separate `runner sweep` commands, or give them the same [resources]",
                sweeps[0].file.display(),
                s.file.display()
            );
        }
    }
    // The ranks of a run and the memory one run may use, as the backend will see them: each run's
    // estimate is for its per-rank micro-batch (the engine's own figure).
    let (ranks, limit) = exec::plan(resources).await;
    let mut planned = Vec::new();
    for s in &sweeps {
        let vocab = s.vocab;
        let rows = s
            .runs
            .iter()
            .map(|r| {
                let sampler = match s.strategy {
                    Strategy::Grid => "grid",
                    _ => "random",
                };
                let sampler = if s.strategy == Strategy::IsoFlop {
                    "isoflop"
                } else {
                    sampler
                };
                Ok(NewRun {
                    budget: r.budget,
                    fork: r.fork,
                    ..NewRun::planned(r.params.clone(), &r.config, vocab, ranks, sampler)?
                })
            })
            .collect::<Result<Vec<_>>>()?;
        planned.push(rows);
    }
    if dry_run {
        for (s, rows) in sweeps.iter().zip(&planned) {
            out(format_args!(
                "sweep {} ({}): {} runs planned\n",
                display_name(&s.spec.name),
                s.file.display(),
                rows.len()
            ));
            if s.strategy == Strategy::IsoFlop {
                // The grid as a scaling study sees it: per cell N (non-embedding parameters), D (tokens),
                // D/N and the FLOPs it spends, then the total.
                out(format_args!(
                    "  isoflop: {:>10}  {:>12}  {:>14}  {:>8}  {:>10}  values\n",
                    "budget", "N", "D (tokens)", "D/N", "FLOPs"
                ));
                let (mut total, mut separate) = (0.0, 0.0);
                for (r, planned) in rows.iter().zip(&s.runs) {
                    let flops = r.flops_per_token
                        * r.params
                            .get("max_tokens")
                            .and_then(|v| v.as_integer())
                            .unwrap_or(0) as f64;
                    separate += flops;
                    // A fork trains only from its fork point on.
                    let per_step = (planned.config.batch_size * planned.config.context_len) as f64;
                    let fork = r
                        .fork
                        .map(|(of, step)| (of, step, r.flops_per_token * per_step * step as f64));
                    total += flops - fork.map_or(0.0, |f| f.2);
                    let tokens = r
                        .params
                        .get("max_tokens")
                        .and_then(|v| v.as_integer())
                        .unwrap_or(0);
                    let values: Vec<String> = r
                        .params
                        .iter()
                        .filter(|(k, _)| k.as_str() != "max_tokens")
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    let forked = fork.map_or(String::new(), |(of, step, _)| {
                        format!("  (forks from run #{of} at step {step})")
                    });
                    out(format_args!(
                        "           {:>10.3e}  {:>12}  {:>14}  {:>8.1}  {:>10.3e}  {}{forked}\n",
                        r.budget.unwrap_or(0.0),
                        r.params_non_embedding,
                        tokens,
                        tokens as f64 / r.params_non_embedding.max(1) as f64,
                        flops,
                        values.join(" ")
                    ));
                }
                out(format_args!(
                    "  total compute: {total:.3e} FLOPs ({:.2}× the {separate:.3e} of training every cell separately)\n",
                    total / separate.max(1e-300)
                ));
            }
            if s.strategy == Strategy::Tpe {
                let axes: Vec<String> = s.space.iter().map(|(k, a)| format!("{k} {a}")).collect();
                out(format_args!(
                    "  tpe: {} trials (the first {} random), seed {}, sampled as results arrive over: {}\n",
                    s.trials,
                    crate::search::tpe::STARTUP_TRIALS,
                    s.seed,
                    axes.join("; ")
                ));
            }
            let es = &s.spec.early_stop;
            if let (true, Some(first)) = (es.enabled(), s.runs.first()) {
                let full = es.budget.full_length(&first.config).unwrap_or(0.0);
                let rungs: Vec<String> = es
                    .rungs_of(&first.config)?
                    .iter()
                    .map(|r| r.to_string())
                    .collect();
                out(format_args!(
                    "  early stopping: {}; run 0 pauses at {} of {full} {}\n",
                    es.describe(),
                    rungs.join(", "),
                    es.budget.as_str()
                ));
            }
            for (i, r) in rows.iter().enumerate() {
                let p: Vec<String> = r.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let need = r.mem_estimate as f64 / (1u64 << 30) as f64;
                let skip = match &limit {
                    Some((l, what)) if need > *l => format!("  will be skipped: {what}"),
                    _ => String::new(),
                };
                out(format_args!(
                    "  {i:>3}  {:<50} params {:>12}  memory ~{:.2} GiB{skip}\n",
                    p.join(" "),
                    r.param_count,
                    need
                ));
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    // Before anything is recorded: a bad RUNNER_ENGINE must not leave a queued sweep behind.
    let engine = EngineCommand::detect()?;
    let store = RunStore::open(home).await?;
    report_recovered(&store).await?;
    let mut sweep_ids = Vec::new();
    let mut search = HashMap::new();
    for (s, rows) in sweeps.iter().zip(&planned) {
        let spec_json = serde_json::to_string(&s.spec)?;
        let id = store
            .create_sweep(&s.spec.name, &s.file.display().to_string(), &spec_json)
            .await?;
        store
            .add_runs(id, rows, s.spec.resources.runs_dir.as_deref())
            .await?;
        eprintln!(
            "sweep s{id} {}: {} runs queued (home {})",
            display_name(&s.spec.name),
            s.runs.len(),
            home.display()
        );
        if s.spec.early_stop.enabled() {
            eprintln!(
                "sweep s{id}: early stopping: {}",
                s.spec.early_stop.describe()
            );
        }
        if s.strategy == Strategy::Tpe {
            eprintln!(
                "sweep s{id}: tpe over {} trials, sampled as results arrive",
                s.trials
            );
        }
        search.insert(id, sweep_search(s, ranks));
        sweep_ids.push(id);
    }
    let mut runs = Vec::new();
    for id in &sweep_ids {
        runs.extend(store.runs(Some(*id)).await?);
    }
    let summary = exec::execute(&store, runs, resources, &engine, search).await?;
    for id in &sweep_ids {
        out(format_args!("sweep s{id}:\n"));
        report_runs(&store, &[Id::Sweep(*id)], "id", Format::Table, None).await?;
    }
    print_summary(&summary);
    Ok(exit_for(&summary))
}

/// How sweep `s` searches in this runner: its sampler (TPE samples trials as results arrive) and its
/// early-stopping rule, if any.
fn sweep_search(s: &Sweep, ranks: usize) -> SweepSearch {
    SweepSearch {
        sampler: match s.strategy {
            Strategy::Tpe => Sampler::Tpe {
                sweep: Box::new(s.clone()),
                ranks,
            },
            _ => Sampler::Planned,
        },
        early: Some(s.spec.early_stop.clone()).filter(|e| e.enabled()),
    }
}

/// Write to stdout; a reader that went away (`runner sweep … | head`) ends the output, not the process:
/// a sweep ignores SIGPIPE (it supervises engines), and `print!` would panic on the broken pipe.
fn out(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_fmt(args).and_then(|()| stdout.flush());
}

/// A name from a sweep file as printable text: control characters (escape sequences, line breaks) are
/// shown escaped rather than sent to the terminal.
pub fn display_name(name: &str) -> String {
    name.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

async fn resume(home: &Path, id: &str) -> Result<ExitCode> {
    let id: Id = id.parse()?;
    exec::check_engine_env()?;
    let store = open_existing(home).await?;
    let (sweep_id, runs, search) = match id {
        Id::Run(r) => {
            let run = store.run(r).await?;
            match run.status {
                RunStatus::Completed => {
                    out(format_args!(
                        "run {r} already completed at step {}; nothing to do\n",
                        run.step
                    ));
                    return Ok(ExitCode::SUCCESS);
                }
                RunStatus::Running if run.slurm_job.is_none() && !store.abandoned(&run) => bail!(
                    "run {r} is running under a live runner{}; wait for it or stop that runner first",
                    run.runner_pid
                        .map(|p| format!(" (pid {p})"))
                        .unwrap_or_default()
                ),
                _ => {}
            }
            // A run resumed on its own trains to its full length (also a paused or pruned one).
            (run.sweep_id, vec![run], false)
        }
        Id::Sweep(s) => {
            store.sweep(s).await?;
            let all = store.runs(Some(s)).await?;
            let count = all.len();
            let todo: Vec<_> = all
                .into_iter()
                .filter(|r| match r.status {
                    // A trial whose values the engine refused when it was planned has nothing to run:
                    // it stays failed with its reason.
                    RunStatus::Failed if r.config.is_empty() => false,
                    // Paused runs take part in the search again: promoted if the rule lets them.
                    RunStatus::Queued
                    | RunStatus::Interrupted
                    | RunStatus::Failed
                    | RunStatus::Paused => true,
                    // A Slurm job that outlived its runner: followed again. A local engine a killed
                    // runner left checkpointing: waited for, then resumed.
                    RunStatus::Running => r.slurm_job.is_some() || store.abandoned(r),
                    _ => false,
                })
                .collect();
            // A TPE sweep with trials left (one was removed, or the runner stopped before it sampled them
            // all) samples them now.
            let trials_left = {
                let spec: SweepFile = serde_json::from_str(&store.sweep_spec(s).await?)
                    .context("reading the sweep's stored spec")?;
                let trials = spec.sweep.get("trials").and_then(|t| t.as_integer());
                spec.sweep.get("strategy").and_then(|v| v.as_str()) == Some("tpe")
                    && trials.is_some_and(|t| t > count as i64)
            };
            if todo.is_empty() && !trials_left {
                out(format_args!(
                    "sweep s{s}: every run is completed, skipped or running under a live runner; nothing to do\n"
                ));
                return Ok(ExitCode::SUCCESS);
            }
            (s, todo, true)
        }
    };
    let sweep = store.sweep(sweep_id).await?;
    let spec: SweepFile = serde_json::from_str(&store.sweep_spec(sweep_id).await?)
        .context("reading the sweep's stored spec")?;
    eprintln!(
        "resuming {} run(s) of sweep s{} {}",
        runs.len(),
        sweep.id,
        display_name(&sweep.name)
    );
    // A skipped run stays skipped; queued/interrupted/failed ones are claimed again. A run whose runner
    // was killed becomes interrupted here (its engine may still be writing its last checkpoint: the
    // launch waits for it).
    let mut todo = Vec::new();
    for mut r in runs {
        if r.status == RunStatus::SkippedOom {
            continue;
        }
        store.release_paused(&r).await?;
        if r.status == RunStatus::Running && r.slurm_job.is_none() {
            if !store.release_abandoned(&r).await? {
                continue;
            }
            r.status = RunStatus::Interrupted;
        }
        todo.push(r);
    }
    let engine = EngineCommand::detect()?;
    let mut plan = HashMap::new();
    if search {
        // A TPE sweep samples its remaining trials from everything recorded so far (the trial number fixes
        // the random stream, so the search continues as it would have).
        let file = PathBuf::from(&sweep.file);
        let vocab = data_prep::Meta::load(&spec.data.dir)
            .map_err(|e| anyhow::anyhow!("[data] dir {}: {e}", spec.data.dir.display()))?
            .vocab_size;
        let s = Sweep::from_spec(&file, spec.clone(), vocab)?;
        let (ranks, _) = exec::plan(&spec.resources).await;
        plan.insert(sweep_id, sweep_search(&s, ranks));
    }
    let summary = exec::execute(&store, todo, &spec.resources, &engine, plan).await?;
    report_runs(&store, &[Id::Sweep(sweep_id)], "id", Format::Table, None).await?;
    print_summary(&summary);
    Ok(exit_for(&summary))
}

/// A fitted number for the scaling table: 4 significant digits, in exponent form when large or small.
fn num(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e4).contains(&a) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

/// `runner scaling`: the completed runs of the sweeps, grouped, fitted, printed.
async fn scaling(
    home: &Path,
    ids: &[String],
    group_by: Option<&str>,
    predict: Option<f64>,
    resamples: usize,
    format: Format,
) -> Result<ExitCode> {
    let store = open_existing(home).await?;
    if let Some(c) = predict {
        if !(c.is_finite() && c > 0.0) {
            bail!("--predict {c}: give a compute budget in FLOPs, a number above 0 (e.g. 3e15)");
        }
    }
    let mut sweeps = Vec::new();
    for id in ids {
        let Id::Sweep(s) = id.parse::<Id>()? else {
            bail!("{id} is a run: give sweep ids (s3), as `runner ls` shows them");
        };
        store.sweep(s).await?;
        sweeps.push(s);
    }
    let (groups, skipped) = crate::scaling::collect(&store, &sweeps, group_by).await?;
    if groups.is_empty() {
        bail!("no completed run with a val loss in {}: run the study first (`runner sweep experiments/scaling.toml`)", ids.join(" "));
    }
    let fitted = crate::scaling::fit_groups(&groups, resamples, predict);
    let fits = &fitted.groups;
    match format {
        Format::Json => {
            let mut v = serde_json::to_value(&fitted)?;
            v["runs_left_out"] = serde_json::json!(skipped);
            out(format_args!("{}\n", serde_json::to_string_pretty(&v)?));
        }
        _ => {
            for f in fits {
                out(format_args!("{} ({} runs)\n", f.name, f.runs));
                if !f.isoflop.is_empty() {
                    out(format_args!(
                        "  approach 2, IsoFLOP minima:\n    {:>10}  {:>12}  {:>14}  {:>8}\n",
                        "budget", "N_opt", "D_opt", "loss"
                    ));
                    for m in &f.isoflop {
                        out(format_args!(
                            "    {:>10.3e}  {:>12.4e}  {:>14.4e}  {:>8.4}\n",
                            m.budget, m.n_opt, m.d_opt, m.loss_opt
                        ));
                    }
                }
                if let Some(fr) = &f.frontier {
                    out(format_args!(
                        "  frontier: N_opt ∝ C^{:.3} [{:.3}, {:.3}], D_opt ∝ C^{:.3} [{:.3}, {:.3}]\n",
                        fr.a, fr.a_ci[0], fr.a_ci[1], fr.b, fr.b_ci[0], fr.b_ci[1]
                    ));
                }
                if let Some(l) = &f.law {
                    let ci = |k: &str| {
                        l.ci.get(k).map_or(String::new(), |c| {
                            format!(" [{}, {}]", num(c[0]), num(c[1]))
                        })
                    };
                    out(format_args!(
                        "  approach 3: L = E + A/N^α + B/D^β with E = {}{}, A = {}{}, α = {}{}, B = {}{}, β = {}{}\n",
                        num(l.E), ci("E"), num(l.A), ci("A"), num(l.alpha), ci("alpha"), num(l.B), ci("B"), num(l.beta), ci("beta")
                    ));
                }
                if let Some(p) = &f.prediction {
                    out(format_args!(
                        "  at {:.3e} FLOPs: N_opt {:.4e}, D_opt {:.4e}, loss {:.4} [{:.4}, {:.4}]\n",
                        p.budget, p.n_opt, p.d_opt, p.loss, p.loss_ci[0], p.loss_ci[1]
                    ));
                }
                for p in &f.problems {
                    out(format_args!("  {p}\n"));
                }
            }
            for c in &fitted.crossovers {
                out(format_args!(
                    "{} and {}: their compute-optimal losses cross at {:.3e} FLOPs\n",
                    c.groups[0], c.groups[1], c.flops
                ));
            }
            if skipped > 0 {
                out(format_args!(
                    "({skipped} runs not completed were left out)\n"
                ));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A run id as typed (`7`); a sweep id is refused where only runs make sense.
fn run_id(s: &str) -> Result<i64> {
    match s.parse::<Id>()? {
        Id::Run(r) => Ok(r),
        Id::Sweep(_) => bail!("{s} is a sweep: give a run id (7), as `runner ls` shows them"),
    }
}

/// `runner rm`: the runs named (a sweep's runs for sN), checked first, confirmed, then each removed
/// from the database and its folder deleted.
async fn rm(home: &Path, ids: &[String], yes: bool) -> Result<ExitCode> {
    let store = open_existing(home).await?;
    let mut runs = std::collections::BTreeMap::new();
    let mut sweeps = Vec::new();
    for id in ids {
        match id.parse::<Id>()? {
            Id::Run(r) => {
                runs.insert(r, store.run(r).await?);
            }
            Id::Sweep(s) => {
                store.sweep(s).await?;
                sweeps.push(s);
                runs.extend(store.runs(Some(s)).await?.into_iter().map(|r| (r.id, r)));
            }
        }
    }
    for id in runs.keys() {
        if let Some(why) = store.rm_refusal(*id).await? {
            bail!("{why}; nothing removed");
        }
    }
    eprintln!("about to remove {} run(s) and their folders:", runs.len());
    for r in runs.values() {
        eprintln!(
            "  {:>5}  s{}  {:<11} step {:>6}  {}",
            r.id, r.sweep_id, r.status, r.step, r.run_dir
        );
    }
    if !yes {
        if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            bail!("not removing without confirmation: stdin is not a terminal; pass --yes to remove them");
        }
        eprint!("remove them? [y/N] ");
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("nothing removed");
            return Ok(ExitCode::FAILURE);
        }
    }
    for r in runs.values() {
        store.remove_run(r.id).await?;
        // The rows first: a folder left by a failed delete is only disk, never a run pointing nowhere.
        if !r.run_dir.is_empty() && Path::new(&r.run_dir).is_dir() {
            std::fs::remove_dir_all(&r.run_dir)
                .with_context(|| format!("removing run {}'s folder {}", r.id, r.run_dir))?;
        }
    }
    for s in sweeps {
        store.remove_sweep_if_empty(s).await?;
    }
    eprintln!("removed {} run(s)", runs.len());
    Ok(ExitCode::SUCCESS)
}

async fn ls(home: &Path, tag: Option<&str>) -> Result<ExitCode> {
    let store = open_existing(home).await?;
    let notes = store.annotations().await?;
    for s in store.sweeps().await? {
        let mut runs = store.runs(Some(s.id)).await?;
        if let Some(t) = tag {
            runs.retain(|r| notes.get(&r.id).is_some_and(|n| n.0.iter().any(|x| x == t)));
            if runs.is_empty() {
                continue;
            }
        }
        let mut counts = std::collections::BTreeMap::new();
        for r in &runs {
            *counts.entry(r.status.to_string()).or_insert(0) += 1;
        }
        let c: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
        println!(
            "s{}  {}  {}  ({})  {}",
            s.id,
            display_name(&s.name),
            s.created_at,
            s.file,
            c.join(", ")
        );
        for r in runs {
            let p: Vec<String> = r
                .params
                .as_object()
                .map(|o| o.iter().map(|(k, v)| format!("{k}={v}")).collect())
                .unwrap_or_default();
            let rung = r.rung.map_or(String::new(), |k| format!("  rung {k}"));
            let (tags, note) = notes.get(&r.id).cloned().unwrap_or_default();
            let tags = if tags.is_empty() {
                String::new()
            } else {
                format!("  [{}]", tags.join(", "))
            };
            let note = note.map_or(String::new(), |n| format!("  # {}", n.replace('\n', " ")));
            println!(
                "  {:>5}  {:<11}  step {:>6}{rung}  {}{tags}{note}",
                r.id,
                r.status,
                r.step,
                p.join(" ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn show(home: &Path, id: &str) -> Result<ExitCode> {
    let store = open_existing(home).await?;
    match id.parse::<Id>()? {
        Id::Sweep(s) => {
            let sw = store.sweep(s).await?;
            println!(
                "sweep s{}: {} ({}), created {}",
                sw.id,
                display_name(&sw.name),
                sw.file,
                sw.created_at
            );
            report_runs(&store, &[Id::Sweep(s)], "id", Format::Table, None).await?;
        }
        Id::Run(r) => {
            let run = store.run(r).await?;
            println!("run {} of sweep s{}: {}", run.id, run.sweep_id, run.status);
            if Path::new(&run.run_dir).is_dir() {
                println!("run dir: {}", run.run_dir);
            } else {
                println!(
                    "run dir: {} (deleted: its checkpoints and metrics.jsonl are gone)",
                    run.run_dir
                );
            }
            if let Some(job) = &run.slurm_job {
                println!("Slurm job: {job}");
            }
            if let Some(k) = run.rung {
                println!("early-stopping rung reached: {k}");
            }
            if let (Some(p), Some(s)) = (run.parent_id, run.fork_step) {
                println!("forked from run {p} at step {s} (its stable phase; this run trained from there)");
            }
            if let Some(f) = run.flops_per_token {
                let budget = run
                    .budget
                    .map_or(String::new(), |b| format!(", budget {b:.3e}"));
                println!(
                    "training FLOPs: {:.3e} so far ({f:.4e} a token{budget}); N without the embedding: {}",
                    f * run.tokens as f64,
                    run.params_non_embedding.unwrap_or(0)
                );
            }
            if run.restarts > 0 {
                println!("resubmitted {} time(s) by the Slurm backend", run.restarts);
            }
            if let Some(e) = &run.error {
                println!("reason: {e}");
            }
            println!("params: {}", run.params);
            println!(
                "step {}/{}  loss {}  val_loss {}  best {}  bpb {}  tokens/s {}",
                run.step,
                run.total_steps.map(|t| t.to_string()).unwrap_or("-".into()),
                fmt_opt(run.loss),
                fmt_opt(run.val_loss),
                fmt_opt(run.best_val_loss),
                fmt_opt(run.val_bpb),
                fmt_opt(run.tokens_per_s)
            );
            println!("\nconfig:\n{}", run.config.trim_end());
            println!("\nevents:");
            for e in store.events(r).await? {
                println!(
                    "  {}  {:<7} {:<11} {}",
                    e.time,
                    e.kind,
                    e.status.unwrap_or_default(),
                    e.reason.unwrap_or_default()
                );
            }
            println!("\ncheckpoints:");
            for c in store.checkpoints(r).await? {
                // Rotated away by keep_checkpoints (or deleted by hand): not offered as usable.
                if Path::new(&c.path).is_dir() {
                    println!("  step {:>6}  {:>10} bytes  {}", c.step, c.bytes, c.path);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into())
}

async fn bench_ingest(
    home: &Path,
    runs: usize,
    steps: usize,
    metrics: usize,
    json: bool,
) -> Result<ExitCode> {
    let store = RunStore::open(home).await?;
    let sweep = store
        .create_sweep("bench-ingest", "(synthetic)", "{}")
        .await?;
    let rows: Vec<_> = (0..runs)
        .map(|i| {
            let mut p = std::collections::BTreeMap::new();
            p.insert("i".to_string(), toml::Value::Integer(i as i64));
            NewRun {
                sampler: None,
                ..NewRun::refused(p, "")
            }
        })
        .collect();
    let ids = store.add_runs(sweep, &rows, None).await?;
    let extra_names: Vec<String> = (0..metrics.saturating_sub(4))
        .map(|i| format!("m{i}"))
        .collect();
    // Synthetic protocol lines, made before the clock starts: the benchmark times parse + ingest.
    let mut lines = Vec::with_capacity(runs * steps);
    for step in 1..=steps as u64 {
        for (r, id) in ids.iter().enumerate() {
            let x = step as f64 + r as f64 * 1e-3;
            let ev = Event::Step {
                step,
                loss: 10.0 / x.sqrt(),
                lr: 1e-3,
                tokens: step * 4096,
                tokens_per_s: 1e5,
                elapsed_s: step as f64 * 0.1,
                grad_norm: 1.0,
                extra: extra_names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (n.clone(), x * i as f64))
                    .collect(),
            };
            lines.push((*id, ev.to_line()));
        }
    }
    let start = Instant::now();
    let (tx, writer) = ingest::spawn_writer(store.clone());
    for (id, line) in &lines {
        let ev = Event::parse(line).context("synthetic line does not parse")?;
        let _ = tx.send(ingest::Msg::Event(*id, ev));
    }
    drop(tx);
    writer.await??;
    let secs = start.elapsed().as_secs_f64();
    for id in &ids {
        store
            .set_status(*id, RunStatus::Completed, "synthetic")
            .await?;
    }
    // Each step event also records its elapsed seconds (the dashboard's wall-time axis).
    let points = runs * steps * (metrics.max(4) + 1);
    let rate = points as f64 / secs;
    // The queries a report makes: the runs of the sweep sorted by val loss, and the full metric history of
    // (up to) 100 runs.
    let t = Instant::now();
    let mut rows: Vec<ReportRow> = store
        .runs(Some(sweep))
        .await?
        .iter()
        .map(ReportRow::from)
        .collect();
    report::sort_rows(&mut rows, "val_loss")?;
    let report_s = t.elapsed().as_secs_f64();
    // MLflow's peer figure is `get_metric_history(run, "loss")` for 100 runs; all metrics is what the HTML
    // report loads.
    let hundred = &ids[..ids.len().min(100)];
    let t = Instant::now();
    let loss = store.history(hundred, "loss").await?;
    let loss_history_s = t.elapsed().as_secs_f64();
    let loss_points: usize = loss.values().map(Vec::len).sum();
    let t = Instant::now();
    let hist = store.histories(hundred).await?;
    let history_s = t.elapsed().as_secs_f64();
    let history_points: usize = hist.values().flat_map(|m| m.values()).map(Vec::len).sum();
    if json {
        println!(
            "{}",
            serde_json::json!({"points": points, "seconds": secs, "points_per_s": rate, "runs": runs, "steps": steps,
                "metrics": metrics.max(4), "report_query_s": report_s, "loss_history_100_runs_s": loss_history_s,
                "loss_history_points": loss_points, "history_100_runs_s": history_s,
                "history_points": history_points})
        );
    } else {
        println!(
            "{points} points in {secs:.3} s: {rate:.0} points/s (sweep s{sweep} in {})",
            home.display()
        );
        println!("report query over {runs} runs: {report_s:.4} s; loss history of 100 runs ({loss_points} points): {loss_history_s:.4} s; all metrics of 100 runs ({history_points} points): {history_s:.4} s");
    }
    Ok(ExitCode::SUCCESS)
}
