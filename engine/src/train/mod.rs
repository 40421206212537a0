//! `engine train`: one training run with periodic evals, atomic checkpoints, exact resume and a JSON-lines
//! event stream (see `engine/PROTOCOL.md`).

pub mod budget;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod emitter;
pub mod loss;
pub mod optim;
pub mod process;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::device::device_for_rank;
use crate::dist::{self, average_gradients, DistEnv};
use crate::events::{Event, PROTOCOL_VERSION};
use crate::model::{build_seeded, BitLlama};
use checkpoint::{
    check_same_tokenizer, config_hash, restore, CheckpointDir, CheckpointState, CHECKPOINT_FORMAT,
};
pub use config::TrainConfig;
use data::TokenData;
use emitter::Emitter;
use optim::{clip_scale, grad_norm, AdamW};
use process::{die_with_parent, install_sigbus_message, install_signal_handlers, lock_run_dir};

/// Windows per validation batch: fixed, so evals of runs with different batch sizes compare.
pub const VAL_BATCH: usize = 8;

/// What `engine train` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct TrainArgs {
    pub config: Option<PathBuf>,
    pub out: Option<PathBuf>,
    pub resume: Option<PathBuf>,
    pub sets: Vec<String>,
    /// Stop at this budget with a `paused` event (an early-stopping rung); the run resumes later.
    pub pause_at: Option<budget::PauseAt>,
}

/// How a run ended (errors are `Err`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// Stopped at `--pause-at` (eval and checkpoint written); exit code 0.
    Paused,
    Interrupted,
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

/// Mean loss over the fixed validation batches, built one at a time; `None` when a stop signal cut the eval
/// short between batches (a long eval must not keep a signalled run from its checkpoint). In a
/// data-parallel run each rank scores the batches with index ≡ rank mod world, the ranks agree after each
/// round whether to stop (a one-float all-reduce), and one all-reduce adds the sums, so every rank gets the
/// same value and none sits idle while another evaluates.
fn evaluate(
    model: &BitLlama,
    data: &TokenData,
    n_batches: usize,
    context_len: usize,
    comm: &mut dyn dist::Communicator,
    stop: &AtomicBool,
) -> Result<Option<f64>> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let device = model.head().device().clone();
    let rounds = n_batches.div_ceil(world);
    let mut sum = 0.0;
    for round in 0..rounds {
        let i = round * world + rank;
        if i < n_batches {
            let (x, y) = data.val_batch(i, n_batches, VAL_BATCH, context_len, &device)?;
            sum += lm_loss(model, &x, &y)?.to_scalar::<f32>()? as f64;
        }
        if round + 1 < rounds {
            let mut flag = [f32::from(u8::from(stop.load(Ordering::SeqCst)))];
            if world > 1 {
                comm.all_reduce_sum(&mut flag)?;
            }
            if flag[0] > 0.0 {
                return Ok(None);
            }
        }
    }
    if world > 1 {
        let mut buf = [sum as f32];
        comm.all_reduce_sum(&mut buf)?;
        sum = buf[0] as f64;
    }
    Ok(Some(sum / n_batches as f64))
}

/// Run `engine train`. Events go to stdout and `RUN_DIR/metrics.jsonl`; an error is also emitted as an
/// `error` event before it is returned.
pub fn train(args: &TrainArgs) -> Result<Outcome> {
    let mut emitter = Emitter::stdout_only();
    let result = train_inner(args, &mut emitter);
    if let Err(e) = &result {
        // Best effort: the error may be the metrics file failing; it still reaches stdout.
        let _ = emitter.emit(&Event::Error {
            message: crate::error_line(e),
        });
    }
    result
}

fn train_inner(args: &TrainArgs, emitter: &mut Emitter) -> Result<Outcome> {
    // Stop signals first: a SIGTERM or a runner's death during set-up (loading data, a checkpoint) is a
    // stop at the first step, never a kill or an engine left training without its runner.
    let stop = install_signal_handlers()?;
    install_sigbus_message();
    die_with_parent(&stop);
    // A test hook: a slow set-up (a big data set, a cold filesystem), so that tests can stop or lose
    // the runner at this moment on purpose.
    if let Some(ms) = std::env::var("BITLLAMA_TEST_SETUP_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
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
    cfg.resolve_model_keys(resuming);
    cfg.validate()?;
    cfg.check_ranks(world, "WORLD_SIZE")?;
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
    if device.is_cpu() {
        crate::device::check_host_memory(cfg.training_memory_estimate(&model_cfg, world))?;
    }
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
    let mut eval_due = false;
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
                eval_due = ck.state.eval_due;
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
    let schedule = cfg.schedule();
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
    })?;
    let t = cfg.context_len;
    // eval_batches, bounded by what the val split holds (more would score the same tokens again).
    let eval_batches = cfg.eval_batches.min(data.max_val_batches(VAL_BATCH, t));
    if eval_batches < cfg.eval_batches && leader {
        tracing::warn!(
            "eval_batches = {} is more than the val split holds at context_len {t} ({eval_batches} batches of {VAL_BATCH} windows without overlap): evaluating {eval_batches}",
            cfg.eval_batches
        );
    }
    let local = cfg.batch_size / world;
    let micro = cfg.micro_batch(world);
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
                last_val: Option<f64>,
                eval_due: bool|
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
            eval_due,
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
    // The eval due at `step` (emitted), or `None` when a stop signal cut it short.
    let eval_at = |step: u64,
                   comm: &mut dyn dist::Communicator,
                   emitter: &mut Emitter|
     -> Result<Option<f64>> {
        let Some(val_loss) = evaluate(&model, &data, eval_batches, t, comm, &stop.any)? else {
            return Ok(None);
        };
        emitter.emit(&Event::Eval {
            step,
            val_loss,
            val_bpb: data.bits_per_byte(val_loss),
        })?;
        Ok(Some(val_loss))
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
    // The step of the last eval that ran (a rung reuses it instead of evaluating twice).
    let mut evaluated_at: Option<u64> = None;
    // An eval a signal cut short before the checkpoint: run it now (the final eval covers a finished run).
    if eval_due && !(cfg.finished(step, tokens, 0.0) || timed_out) {
        match eval_at(step, comm.as_mut(), emitter)? {
            Some(v) => (last_val, eval_due, evaluated_at) = (Some(v), false, Some(step)),
            None => stopped = true,
        }
    }
    // Paused already (a resume whose rung was reached before): evaluate and stop without a step.
    let mut paused = args
        .pause_at
        .is_some_and(|p| p.reached(step, tokens, elapsed_before));
    let mut patient = false;
    while !stopped && !paused && !cfg.finished(step, tokens, 0.0) && !timed_out {
        let lr = schedule.at(step);
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
        // The rung of `--pause-at`, judged on the counters after this step (seconds: now), agreed by all ranks.
        let pause_due = args.pause_at.is_some_and(|p| {
            p.reached(
                step + 1,
                tokens + (cfg.batch_size * t) as u64,
                elapsed(&started),
            )
        });
        let flags = [
            stop.any.load(Ordering::SeqCst),
            time_up(&started),
            pause_due,
        ];
        // Through the communicator whenever it is a real one: also a one-rank NCCL check run exercises it.
        let (loss, [any_stop, any_time_up, any_pause], allreduce_ms) = if comm.is_collective() {
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
        (stopped, timed_out, paused) = (any_stop, any_time_up, any_pause);
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
            })?;
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
        // Also when stopping: the resume starts after this step. An eval a signal cuts short is recorded
        // as due in the checkpoint below, and the resume runs it first.
        if step % cfg.eval_every == 0 && !finishing {
            match eval_at(step, comm.as_mut(), emitter)? {
                Some(v) => (last_val, evaluated_at) = (Some(v), Some(step)),
                None => (eval_due, stopped) = (true, true),
            }
        }
        if step % cfg.checkpoint_every == 0 && !finishing && !eval_due {
            if let Some(ev) = save(step, tokens, elapsed(&started), &rng, &opt, last_val, false)? {
                emitter.emit(&ev)?;
            }
            saved_at = step;
        }
    }
    bar.finish_and_clear();

    // 4. Interrupted: checkpoint and stop. Finished: final eval and checkpoint.
    // Paused at a rung: eval (the one of this step when it ran), checkpoint, `paused`.
    let finished = cfg.finished(step, tokens, 0.0) || timed_out;
    let paused = paused && !finished && !stopped;
    let final_val = if finished || paused {
        match (evaluated_at, last_val) {
            (Some(at), Some(v)) if at == step && paused => Some(v),
            _ => eval_at(step, comm.as_mut(), emitter)?,
        }
    } else {
        None
    };
    let Some(final_val) = final_val else {
        // Stopped by a signal (mid-run, or during the final eval: then the resume only evaluates).
        if saved_at != step || eval_due || finished || paused {
            let due = eval_due || finished || paused;
            if let Some(ev) = save(step, tokens, elapsed(&started), &rng, &opt, last_val, due)? {
                emitter.emit(&ev)?;
            }
        }
        emitter.emit(&Event::Interrupted {
            step,
            signal: stop.name().into(),
        })?;
        return Ok(Outcome::Interrupted);
    };
    if let Some(ev) = save(
        step,
        tokens,
        elapsed(&started),
        &rng,
        &opt,
        Some(final_val),
        false,
    )? {
        emitter.emit(&ev)?;
    }
    if paused {
        emitter.emit(&Event::Paused {
            step,
            tokens,
            elapsed_s: elapsed(&started),
            val_loss: final_val,
            val_bpb: data.bits_per_byte(final_val),
        })?;
        return Ok(Outcome::Paused);
    }
    emitter.emit(&Event::Done {
        step,
        tokens,
        elapsed_s: elapsed(&started),
        val_loss: Some(final_val),
        val_bpb: Some(data.bits_per_byte(final_val)),
        params_sha256: Some(params_sha256(&named)?),
    })?;
    Ok(Outcome::Done)
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
