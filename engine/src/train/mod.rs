//! `engine train`: one training run with periodic evals, atomic checkpoints, exact resume and a JSON-lines
//! event stream (see `engine/PROTOCOL.md`).

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod emitter;
pub mod loss;
pub mod optim;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::dist::{self, DistEnv};
use crate::events::{Event, PROTOCOL_VERSION};
use crate::model::{build_seeded, BitLlama, ModelConfig};
use checkpoint::{config_hash, CheckpointDir, CheckpointState, CHECKPOINT_FORMAT};
pub use config::TrainConfig;
use data::TokenData;
use emitter::Emitter;
use optim::{clip_scale, grad_norm, lr_at, AdamW};

/// Windows per validation batch: fixed, so evals of runs with different batch sizes compare.
pub const VAL_BATCH: usize = 8;

/// What `engine train` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct TrainArgs {
    pub config: Option<PathBuf>,
    pub out: Option<PathBuf>,
    pub resume: Option<PathBuf>,
    pub sets: Vec<String>,
}

/// How a run ended (errors are `Err`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Interrupted,
}

/// The device named by `device = "cpu" | "cuda:N"`.
pub fn device_from_name(name: &str) -> Result<Device> {
    device_for_rank(name, 0)
}

/// As [`device_from_name`]; plain `"cuda"` is GPU `local_rank` (one rank per GPU of a node, as under
/// `srun` with all the node's GPUs visible to every task).
pub fn device_for_rank(name: &str, local_rank: usize) -> Result<Device> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = if name == "cuda" {
        Some(local_rank)
    } else {
        name.strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
    };
    let Some(ordinal) = ordinal else {
        bail!(
            "device = {name:?} is not known: use \"cpu\", \"cuda\" (GPU LOCAL_RANK) or \"cuda:N\""
        );
    };
    if !candle_core::utils::cuda_is_available() {
        bail!("device = {name:?} needs an engine built with `--features cuda`: this build is CPU-only, use device = \"cpu\"");
    }
    Ok(Device::new_cuda(ordinal)?)
}

/// Mean next-token cross entropy of `model` on (x, y).
pub fn lm_loss(model: &BitLlama, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let (hidden, _) = model.hidden_with_state(x, None)?;
    Ok(loss::linear_cross_entropy(
        &hidden,
        model.head(),
        &y.flatten_all()?,
    )?)
}

/// Sum two gradient stores (gradient accumulation).
fn add_grads(mut acc: GradStore, g: GradStore, vars: &[Var]) -> Result<GradStore> {
    for v in vars {
        if let Some(new) = g.get(v.as_tensor()) {
            let sum = match acc.remove(v.as_tensor()) {
                Some(old) => (old + new)?,
                None => new.clone(),
            };
            acc.insert(v.as_tensor(), sum);
        }
    }
    Ok(acc)
}

/// Mean loss over the fixed validation batches. In a data-parallel run each rank evaluates its share
/// (`batches` holds the ones with index ≡ rank mod world) and one all-reduce adds the sums, so every rank
/// gets the same value and none sits idle while another evaluates.
fn evaluate(
    model: &BitLlama,
    batches: &[(Tensor, Tensor)],
    total: usize,
    comm: &mut dyn dist::Communicator,
) -> Result<f64> {
    let mut sum = 0.0;
    for (x, y) in batches {
        sum += lm_loss(model, x, y)?.to_scalar::<f32>()? as f64;
    }
    if comm.world_size() > 1 {
        let mut buf = [sum as f32];
        comm.all_reduce_sum(&mut buf)?;
        sum = buf[0] as f64;
    }
    Ok(sum / total as f64)
}

/// A resumed run must read its data through the tokenizer it was trained with: the copy in the run dir
/// and `data_dir`'s must be the same file (the vocab size alone does not catch a rebuilt data dir).
fn check_same_tokenizer(run_dir: &Path, data_dir: &Path) -> Result<()> {
    let (ours, theirs) = (
        run_dir.join("tokenizer.json"),
        data_dir.join("tokenizer.json"),
    );
    if let (Ok(a), Ok(b)) = (std::fs::read(&ours), std::fs::read(&theirs)) {
        if a != b {
            bail!(
                "{} differs from the tokenizer this run was trained with ({}): point data_dir at the data the run was made with",
                theirs.display(),
                ours.display()
            );
        }
    }
    Ok(())
}

/// Load a checkpoint's tensors into the model's variables, refusing another architecture.
fn restore(
    varmap: &candle_nn::VarMap,
    ck: &checkpoint::LoadedCheckpoint,
    model_cfg: &ModelConfig,
) -> Result<()> {
    if ck.state.model_config.vocab_size != model_cfg.vocab_size {
        bail!(
            "checkpoint {} was trained with vocab {} but data_dir's meta.json has vocab {}: point data_dir at the data the run was trained on",
            ck.path.display(),
            ck.state.model_config.vocab_size,
            model_cfg.vocab_size
        );
    }
    if ck.state.config_hash != config_hash(model_cfg) {
        let (was, now) = (
            serde_json::to_value(&ck.state.model_config)?,
            serde_json::to_value(model_cfg)?,
        );
        let changed: Vec<String> = match (was.as_object(), now.as_object()) {
            (Some(a), Some(b)) => a
                .iter()
                .filter(|(k, v)| b.get(*k) != Some(*v))
                .map(|(k, v)| {
                    format!(
                        "{k} = {v} in the checkpoint, {} now",
                        b.get(k).unwrap_or(&serde_json::Value::Null)
                    )
                })
                .collect(),
            _ => vec![],
        };
        bail!(
            "checkpoint {} is from a different model config ({}): model keys cannot change on resume",
            ck.path.display(),
            if changed.is_empty() { "its hash differs".to_string() } else { changed.join(", ") }
        );
    }
    let data = varmap.data().lock().expect("varmap lock");
    for (name, var) in data.iter() {
        let Some(t) = ck.model.get(name) else {
            bail!("checkpoint {} has no tensor {name}", ck.path.display());
        };
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)
            .with_context(|| format!("restoring {name}"))?;
    }
    Ok(())
}

/// Take the run directory's lock so two engines never write the same run.
fn lock_run_dir(run_dir: &Path) -> Result<std::fs::File> {
    let path = run_dir.join(".lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!(
                "run dir {} is in use by another engine process",
                run_dir.display()
            )
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).context("locking the run dir"),
    }
}

/// Register SIGINT/SIGTERM: the first sets the returned flag (finish the step, checkpoint, exit); a second
/// one exits at once with the interrupted code.
fn install_signal_handlers() -> Result<Signals> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let signals = Signals {
        any: Arc::new(AtomicBool::new(false)),
        term: Arc::new(AtomicBool::new(false)),
        int: Arc::new(AtomicBool::new(false)),
        parent: Arc::new(AtomicBool::new(false)),
    };
    for (sig, which) in [(SIGINT, &signals.int), (SIGTERM, &signals.term)] {
        signal_hook::flag::register_conditional_shutdown(
            sig,
            crate::events::EXIT_INTERRUPTED,
            signals.any.clone(),
        )?;
        signal_hook::flag::register(sig, signals.any.clone())?;
        signal_hook::flag::register(sig, which.clone())?;
    }
    // The parent-death signal (see `die_with_parent`) only ever asks for a graceful stop: the kernel may
    // deliver it more than once (once per thread that inherited the setting), which as SIGTERM counted as
    // the "second signal" and exited without the checkpoint.
    signal_hook::flag::register(PARENT_DEATH_SIGNAL, signals.any.clone())?;
    signal_hook::flag::register(PARENT_DEATH_SIGNAL, signals.parent.clone())?;
    Ok(signals)
}

/// SIGBUS here means a memory-mapped token file shrank or was rewritten in place under the run (a `cp` over
/// train.bin; `data_prep build` replaces files atomically). Say so in one line instead of dying silently.
fn install_sigbus_message() {
    extern "C" fn on_sigbus(_: libc::c_int) {
        const MSG: &[u8] = b"error: a token file of data_dir changed or shrank under the running engine (SIGBUS): \
rebuild the data with `data_prep build --force` (it replaces files atomically) and resume from the last checkpoint\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe.
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            libc::_exit(1);
        }
    }
    // SAFETY: installing a handler that only calls async-signal-safe functions.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
}

/// Sent by the kernel when the launching process (the runner) dies.
const PARENT_DEATH_SIGNAL: i32 = signal_hook::consts::SIGUSR1;

/// Which stop signals this process received.
struct Signals {
    any: Arc<AtomicBool>,
    term: Arc<AtomicBool>,
    int: Arc<AtomicBool>,
    parent: Arc<AtomicBool>,
}

impl Signals {
    /// The name the `interrupted` event carries: the signal this process got, "parent" when the
    /// launching process died, or, in a data-parallel run stopped because another rank was signalled,
    /// "peer".
    fn name(&self) -> &'static str {
        if self.term.load(Ordering::SeqCst) {
            "SIGTERM"
        } else if self.int.load(Ordering::SeqCst) {
            "SIGINT"
        } else if self.parent.load(Ordering::SeqCst) {
            "parent"
        } else {
            "peer"
        }
    }
}

/// Ask the kernel to signal this process when the launching process (e.g. the runner) dies, so no engine
/// outlives its runner as an orphan: it checkpoints and stops as on SIGTERM (see `PARENT_DEATH_SIGNAL`).
fn die_with_parent() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers and has no memory effects.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL);
    }
}

/// Run `engine train`. Events go to stdout and `RUN_DIR/metrics.jsonl`; an error is also emitted as an
/// `error` event before it is returned.
pub fn train(args: &TrainArgs) -> Result<Outcome> {
    let mut emitter = Emitter::stdout_only();
    let result = train_inner(args, &mut emitter);
    if let Err(e) = &result {
        emitter.emit(&Event::Error {
            message: crate::error_line(e),
        });
    }
    result
}

fn train_inner(args: &TrainArgs, emitter: &mut Emitter) -> Result<Outcome> {
    let dist = DistEnv::from_env()?;
    let world = dist.world_size;
    let leader = dist.is_leader();
    // 1. Resolve the run dir and config.
    let (run_dir, mut cfg, resuming) = match (&args.resume, &args.out) {
        (Some(dir), _) => {
            let file = dir.join("config.toml");
            if !file.is_file() {
                bail!("{} has no config.toml: --resume needs a run dir made by `engine train --out`", dir.display());
            }
            (dir.clone(), TrainConfig::load(Some(&file), &args.sets)?, true)
        }
        (None, Some(out)) => {
            let cfg = TrainConfig::load(args.config.as_deref(), &args.sets)?;
            if CheckpointDir::new(out).any() {
                bail!("{} already holds checkpoints: continue it with `engine train --resume {}` or pick a new --out", out.display(), out.display());
            }
            (out.clone(), cfg, false)
        }
        (None, None) => bail!("say where the run goes: `engine train --config RUN.toml --out RUN_DIR` (or --resume RUN_DIR)"),
    };
    cfg.validate()?;
    if cfg.batch_size % (world * cfg.grad_accum) != 0 {
        bail!(
            "batch_size = {} must be divisible by WORLD_SIZE × grad_accum = {world} × {}: each rank takes an equal slice of every batch",
            cfg.batch_size,
            cfg.grad_accum
        );
    }
    let data_dir = cfg.data_dir.clone().expect("validated");
    if resuming && data_dir.is_relative() && !data_dir.exists() {
        bail!(
            "data_dir {} in {} is relative to the folder the run was started from, and not found from here: resume from that folder, or pass --set data_dir=ABSOLUTE_PATH",
            data_dir.display(),
            run_dir.join("config.toml").display()
        );
    }
    // Stored absolute (config.toml), so that a later resume works from any folder.
    let data_dir = std::path::absolute(&data_dir).unwrap_or(data_dir);
    cfg.data_dir = Some(data_dir.clone());
    let data = TokenData::open(&data_dir)?;
    data.check_context(cfg.context_len)?;
    let model_cfg = cfg.model_config(data.meta.vocab_size);
    model_cfg.validate()?;
    let device = device_for_rank(&cfg.device, dist.local_rank)?;
    // bf16: the big matmuls in bf16 on this thread; weights, optimizer and loss stay f32.
    let _autocast = crate::model::precision::Autocast::new(match cfg.dtype.as_str() {
        "bf16" => DType::BF16,
        _ => DType::F32,
    });

    // Rank 0 alone owns the run dir: lock, config, tokenizer, metrics, checkpoints. The config and the
    // tokenizer are written only once the checkpoint has been checked against them (below), so a refused
    // `--set` on resume leaves the run as it was; metrics.jsonl records every error, a refusal too (a
    // Slurm runner learns of failures from that file).
    let _lock = if leader {
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating run dir {}", run_dir.display()))?;
        let lock = lock_run_dir(&run_dir)?;
        emitter.attach_file(&run_dir.join("metrics.jsonl"))?;
        Some(lock)
    } else {
        None
    };

    // 2. Model, optimizer, data RNG — fresh or from the newest valid checkpoint.
    let (varmap, model) = build_seeded(&model_cfg, cfg.seed, DType::F32, &device)?;
    let named: BTreeMap<String, Var> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .clone()
        .into_iter()
        .collect();
    let vars: Vec<Var> = named.values().cloned().collect();
    let mut opt = AdamW::new(&named, cfg.weight_decay)?;
    let mut data_seed = cfg.seed;
    let mut rng = ChaCha8Rng::seed_from_u64(data_seed);
    let (mut step, mut tokens, mut elapsed_before) = (0u64, 0u64, 0f64);
    let ckpts = CheckpointDir::new(&run_dir);
    let mut last_val: Option<f64> = None;
    // Corrupt checkpoints passed over on resume, set aside once every rank agrees on the step.
    let mut unusable: Vec<PathBuf> = Vec::new();
    if resuming {
        match ckpts.load_latest(&device)? {
            Some(ck) => {
                if ck.state.world_size != world {
                    bail!(
                        "{} was trained with {} rank(s) but this resume has WORLD_SIZE = {world}: resume it with {} rank(s)",
                        run_dir.display(),
                        ck.state.world_size,
                        ck.state.world_size
                    );
                }
                restore(&varmap, &ck, &model_cfg)?;
                check_same_tokenizer(&run_dir, &data_dir)?;
                unusable = ck.skipped.clone();
                opt.load_state(&ck.optimizer, ck.state.step)?;
                data_seed = ck.state.rng_seed;
                rng = ChaCha8Rng::seed_from_u64(data_seed);
                rng.set_word_pos(
                    ck.state
                        .rng_word_pos
                        .parse()
                        .context("rng_word_pos in state.json")?,
                );
                (step, tokens, elapsed_before) =
                    (ck.state.step, ck.state.tokens, ck.state.elapsed_s);
                last_val = ck.state.last_val_loss;
                tracing::info!("resuming from {} (step {step})", ck.path.display());
            }
            None => tracing::warn!(
                "{} has no checkpoint yet: starting from step 0",
                run_dir.display()
            ),
        }
    }
    if leader {
        checkpoint::write_atomic(&run_dir.join("config.toml"), cfg.to_toml()?.as_bytes())?;
        let tok_src = data_dir.join("tokenizer.json");
        if tok_src.is_file() {
            let bytes = std::fs::read(&tok_src)
                .with_context(|| format!("reading {}", tok_src.display()))?;
            checkpoint::write_atomic(&run_dir.join("tokenizer.json"), &bytes)
                .context("copying tokenizer.json into the run dir")?;
        }
    }
    let mut comm = dist::connect(&dist, &device)?;
    if world > 1 {
        // Every rank must continue from the same step.
        let mut probe = [step as f32, 1.0];
        comm.all_reduce_sum(&mut probe)?;
        if probe[0] != step as f32 * world as f32 {
            bail!("ranks resumed from different checkpoints (this rank: step {step}); is RUN_DIR on a filesystem all ranks share?");
        }
    }
    if leader && !unusable.is_empty() {
        ckpts.set_aside(&unusable);
    }

    let horizon = cfg.schedule_horizon();
    if resuming && cfg.finished(step, tokens, 0.0) {
        tracing::warn!(
            "the run is already at step {step}, which its steps/max_tokens reach: nothing to train (raise them with --set to continue)"
        );
    }
    emitter.emit(&Event::Start {
        protocol: PROTOCOL_VERSION,
        run_dir: run_dir.display().to_string(),
        step,
        total_steps: horizon,
        params: model_cfg.param_count() as u64,
        resumed: resuming,
        device: cfg.device.clone(),
        world_size: world,
    });
    let stop = install_signal_handlers()?;
    install_sigbus_message();
    die_with_parent();
    // This rank's share of the fixed validation batches (all of them in a single-process run).
    let val_batches: Vec<(Tensor, Tensor)> = data
        .val_batches(cfg.eval_batches, VAL_BATCH, cfg.context_len, &device)?
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % world == dist.rank)
        .map(|(_, b)| b)
        .collect();
    let local = cfg.batch_size / world;
    let micro = local / cfg.grad_accum;
    let t = cfg.context_len;
    let bar = if leader {
        progress_bar(horizon, step)
    } else {
        ProgressBar::hidden()
    };

    let save = |step: u64,
                tokens: u64,
                elapsed: f64,
                rng: &ChaCha8Rng,
                opt: &AdamW,
                last_val: Option<f64>|
     -> Result<Option<Event>> {
        if !leader {
            return Ok(None);
        }
        let state = CheckpointState {
            format_version: CHECKPOINT_FORMAT,
            step,
            tokens,
            elapsed_s: elapsed,
            // The seed of the stream in use (a resumed run keeps its own even under `--set seed=…`).
            rng_seed: data_seed,
            rng_word_pos: rng.get_word_pos().to_string(),
            config_hash: config_hash(&model_cfg),
            model_config: model_cfg.clone(),
            world_size: world,
            model_sha256: String::new(),
            optimizer_sha256: String::new(),
            last_val_loss: last_val,
        };
        let tensors = named
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let (path, bytes) =
            ckpts.save(state, &tensors, &opt.state_tensors(), cfg.keep_checkpoints)?;
        Ok(Some(Event::Checkpoint {
            step,
            path: path.display().to_string(),
            bytes,
        }))
    };

    // 3. The loop. Every rank draws the same global batch and trains on its slice; the all-reduce also
    // carries the loss and the stop/time-up flags, so all ranks agree on when to stop.
    let started = Instant::now();
    let mut window = (Instant::now(), tokens);
    let elapsed = |started: &Instant| elapsed_before + started.elapsed().as_secs_f64();
    let time_up = |started: &Instant| cfg.max_seconds.is_some_and(|s| elapsed(started) >= s);
    let mut saved_at = step;
    // Decided from the checkpoint's clock alone, so every rank agrees without a collective: a run resumed
    // after its max_seconds were spent takes no further step.
    let (mut stopped, mut timed_out) =
        (false, cfg.max_seconds.is_some_and(|s| elapsed_before >= s));
    let mut patient = false;
    while !cfg.finished(step, tokens, 0.0) && !timed_out {
        let lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, horizon);
        let starts = data.sample_starts(&mut rng, cfg.batch_size, t);
        let mine = &starts[dist.rank * local..(dist.rank + 1) * local];
        let (mut grads, mut loss_sum) = (None::<GradStore>, 0f64);
        for chunk in mine.chunks(micro) {
            let (x, y) = data.train_batch(chunk, t, &device)?;
            let loss = lm_loss(&model, &x, &y)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            let g = (loss / cfg.grad_accum as f64)?.backward()?;
            grads = Some(match grads {
                None => g,
                Some(acc) => add_grads(acc, g, &vars)?,
            });
        }
        let mut grads = grads.expect("at least one micro-batch");
        let flags = [stop.any.load(Ordering::SeqCst), time_up(&started)];
        // Through the communicator whenever it is a real one: also a one-rank NCCL check run exercises it.
        let (loss, [any_stop, any_time_up], allreduce_ms) = if comm.is_collective() {
            let (loss, flags, ms) =
                average_gradients(comm.as_mut(), &mut grads, &vars, loss_sum, flags)?;
            (loss, flags, Some(ms))
        } else {
            (loss_sum, flags, None)
        };
        let loss = loss / (cfg.grad_accum * world) as f64;
        let grad_norm = grad_norm(&grads, &vars)?;
        // Checked before the update, so the weights (and any later checkpoint) never hold NaN/inf.
        if !loss.is_finite() || !grad_norm.is_finite() {
            bail!(
                "loss became {loss} (gradient norm {grad_norm}) at step {}: lower lr or raise warmup_steps (the weights were not updated; the last checkpoint is intact)",
                step + 1
            );
        }
        opt.update_scaled(&grads, lr, clip_scale(grad_norm, cfg.grad_clip))?;
        step += 1;
        tokens += (cfg.batch_size * t) as u64;
        (stopped, timed_out) = (any_stop, any_time_up);
        bar.set_position(step);
        bar.set_message(format!("loss {loss:.4}"));

        if step % cfg.log_every == 0 {
            let secs = window.0.elapsed().as_secs_f64().max(1e-9);
            let tps = (tokens - window.1) as f64 / secs;
            window = (Instant::now(), tokens);
            bar.set_message(format!("loss {loss:.4} · {tps:.0} tok/s"));
            emitter.emit(&Event::Step {
                step,
                loss,
                lr,
                tokens,
                tokens_per_s: tps,
                elapsed_s: elapsed(&started),
                grad_norm,
                // The gradient all-reduce of this step (data-parallel runs), for its share of the step time.
                extra: allreduce_ms
                    .map(|ms| [("allreduce_ms".to_string(), ms)].into())
                    .unwrap_or_default(),
            });
        }
        let finishing = cfg.finished(step, tokens, 0.0) || timed_out;
        // Every rank knows whether the leader writes a checkpoint now; the others then wait longer for
        // it in the next all-reduce.
        let leader_work = !finishing && step % cfg.checkpoint_every == 0;
        if world > 1 && leader_work != patient {
            patient = leader_work;
            comm.set_timeout(if patient {
                dist::leader_work_timeout()
            } else {
                dist::timeout()
            })?;
        }
        // Also when stopping: the resume starts after this step, so an eval skipped now would be lost.
        if step % cfg.eval_every == 0 && !finishing {
            let val_loss = evaluate(&model, &val_batches, cfg.eval_batches, comm.as_mut())?;
            last_val = Some(val_loss);
            emitter.emit(&Event::Eval {
                step,
                val_loss,
                val_bpb: data.bits_per_byte(val_loss),
            });
        }
        if step % cfg.checkpoint_every == 0 && !finishing {
            if let Some(ev) = save(step, tokens, elapsed(&started), &rng, &opt, last_val)? {
                emitter.emit(&ev);
            }
            saved_at = step;
        }
        if stopped {
            break;
        }
    }
    bar.finish_and_clear();

    // 4. Interrupted: checkpoint and stop. Finished: final eval and checkpoint.
    if stopped && !(cfg.finished(step, tokens, 0.0) || timed_out) {
        if saved_at != step {
            if let Some(ev) = save(step, tokens, elapsed(&started), &rng, &opt, last_val)? {
                emitter.emit(&ev);
            }
        }
        emitter.emit(&Event::Interrupted {
            step,
            signal: stop.name().into(),
        });
        return Ok(Outcome::Interrupted);
    }
    let final_val = evaluate(&model, &val_batches, cfg.eval_batches, comm.as_mut())?;
    let val_bpb = data.bits_per_byte(final_val);
    emitter.emit(&Event::Eval {
        step,
        val_loss: final_val,
        val_bpb,
    });
    if let Some(ev) = save(step, tokens, elapsed(&started), &rng, &opt, Some(final_val))? {
        emitter.emit(&ev);
    }
    emitter.emit(&Event::Done {
        step,
        tokens,
        elapsed_s: elapsed(&started),
        val_loss: Some(final_val),
        val_bpb: Some(val_bpb),
        params_sha256: Some(params_sha256(&named)?),
    });
    Ok(Outcome::Done)
}

/// Average gradients across ranks with one flat all-reduce per bucket; the same buffer carries the
/// local loss sum and the stop/time-up flags. Returns the global loss sum, whether any rank set a flag,
/// and the all-reduce's milliseconds (the device is synchronised first, so backward is not counted).
fn average_gradients(
    comm: &mut dyn dist::Communicator,
    grads: &mut GradStore,
    vars: &[Var],
    loss_sum: f64,
    flags: [bool; 2],
) -> Result<(f64, [bool; 2], f64)> {
    let world = comm.world_size() as f64;
    // One flat f32 buffer on the training device: every gradient, then the loss and the two flags.
    let mut parts = Vec::with_capacity(vars.len() + 1);
    let mut shapes = Vec::with_capacity(vars.len());
    for v in vars {
        match grads.get(v.as_tensor()) {
            Some(g) => {
                shapes.push(Some((g.shape().clone(), g.dtype())));
                parts.push(g.to_dtype(DType::F32)?.flatten_all()?);
            }
            None => shapes.push(None),
        }
    }
    let device = vars
        .first()
        .map_or(candle_core::Device::Cpu, |v| v.device().clone());
    let tail = [
        loss_sum as f32,
        f32::from(u8::from(flags[0])),
        f32::from(u8::from(flags[1])),
    ];
    parts.push(Tensor::new(&tail, &device)?);
    let flat = Tensor::cat(&parts, 0)?;
    let n_grads = flat.elem_count() - tail.len();
    flat.device().synchronize()?;
    let started = Instant::now();
    let summed = comm.all_reduce_tensor_sum(&flat)?;
    // Both backends return once the sum is complete (NCCL: its completion event was waited for).
    let allreduce_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut offset = 0;
    for (v, shape) in vars.iter().zip(shapes) {
        let Some((shape, dtype)) = shape else {
            continue;
        };
        let len = shape.elem_count();
        let avg = (summed.narrow(0, offset, len)? / world)?;
        offset += len;
        grads.insert(v.as_tensor(), avg.reshape(shape)?.to_dtype(dtype)?);
    }
    let tail = summed.narrow(0, n_grads, 3)?.to_vec1::<f32>()?;
    Ok((tail[0] as f64, [tail[1] > 0.0, tail[2] > 0.0], allreduce_ms))
}

/// sha256 over every parameter's bytes in name order: equal on every rank of a data-parallel run.
fn params_sha256(named: &BTreeMap<String, Var>) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (name, v) in named {
        h.update(name.as_bytes());
        for x in v
            .as_tensor()
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
        {
            h.update(x.to_le_bytes());
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// An indicatif bar on a terminal; hidden otherwise (the step events are the plain-text progress).
fn progress_bar(total: Option<u64>, pos: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::no_length(),
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} step {pos}/{len} [{elapsed_precise} eta {eta}] {bar:30} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(pos);
    bar
}
