//! `engine bench-train`: time training steps (forward + backward + AdamW) of a model with random weights on
//! random tokens, the same workload as the PyTorch peer (`bitllama_torch.py`), plus the time to write and
//! load one checkpoint. Prints one JSON object.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::model::{build_seeded, MixerKind, ModelConfig, WeightKind};
use crate::train::checkpoint::{config_hash, CheckpointDir, CheckpointState, CHECKPOINT_FORMAT};
use crate::train::lm_loss;
use crate::train::optim::AdamW;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchTrain {
    pub model: ModelConfig,
    pub batch: usize,
    pub ctx: usize,
    pub steps: usize,
    pub warmup: usize,
    pub device: Device,
}

#[derive(Debug, Serialize)]
pub struct BenchTrainResult {
    pub impl_name: &'static str,
    pub dim: usize,
    pub layers: usize,
    pub heads: usize,
    pub mixer: String,
    pub weights: String,
    pub batch: usize,
    pub ctx: usize,
    pub params: usize,
    pub steps: usize,
    pub ms_per_step: f64,
    /// Milliseconds per step in the forward pass with the loss, in backward, and in the optimizer.
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    pub tokens_per_s: f64,
    /// Peak resident set size of this process (VmHWM).
    pub peak_mem_bytes: u64,
    pub checkpoint_bytes: u64,
    pub checkpoint_write_s: f64,
    pub checkpoint_load_s: f64,
    pub threads: usize,
}

/// Peak RSS of this process in bytes (Linux `VmHWM`), 0 elsewhere.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
        })
        .map_or(0, |kb| kb * 1024)
}

pub fn bench_train(b: &BenchTrain) -> Result<BenchTrainResult> {
    b.model.validate()?;
    let (varmap, model) = build_seeded(&b.model, 0, DType::F32, &b.device)?;
    let named = varmap.data().lock().expect("varmap lock").clone();
    let mut opt = AdamW::new(&named, 0.0)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let vocab = b.model.vocab_size as u32;
    // A pool of 4 random batches, cycled (as the peer does).
    let pool: Vec<(Tensor, Tensor)> = (0..4)
        .map(|_| {
            let n = b.batch * b.ctx;
            let x: Vec<u32> = (0..n).map(|_| rng.gen_range(0..vocab)).collect();
            let y: Vec<u32> = (0..n).map(|_| rng.gen_range(0..vocab)).collect();
            Ok((
                Tensor::from_vec(x, (b.batch, b.ctx), &b.device)?,
                Tensor::from_vec(y, (b.batch, b.ctx), &b.device)?,
            ))
        })
        .collect::<Result<_>>()?;
    // Seconds spent in forward (with the loss), backward and the optimizer over the timed steps.
    let mut phases = [0.0f64; 3];
    let mut step = |i: usize, phases: &mut [f64; 3]| -> Result<()> {
        let (x, y) = &pool[i % pool.len()];
        let t = Instant::now();
        let loss = lm_loss(&model, x, y)?;
        b.device.synchronize()?;
        phases[0] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let grads = loss.backward()?;
        b.device.synchronize()?;
        phases[1] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        opt.update(&grads, 3e-4)?;
        b.device.synchronize()?;
        phases[2] += t.elapsed().as_secs_f64();
        Ok(())
    };
    for i in 0..b.warmup {
        step(i, &mut [0.0; 3])?;
    }
    let t0 = Instant::now();
    for i in 0..b.steps {
        step(b.warmup + i, &mut phases)?;
    }
    let dt = t0.elapsed().as_secs_f64();
    let per_step_ms = |s: f64| s * 1000.0 / b.steps as f64;

    // One checkpoint written and read back.
    let dir = std::env::temp_dir().join(format!("engine-bench-{}", std::process::id()));
    let ckpts = CheckpointDir::new(&dir);
    let state = CheckpointState {
        format_version: CHECKPOINT_FORMAT,
        step: 1,
        tokens: 0,
        elapsed_s: 0.0,
        rng_seed: 0,
        rng_word_pos: "0".into(),
        config_hash: config_hash(&b.model),
        model_config: b.model.clone(),
        world_size: 1,
        model_sha256: String::new(),
        optimizer_sha256: String::new(),
        last_val_loss: None,
        eval_due: false,
    };
    let tensors = named
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let t1 = Instant::now();
    let (path, bytes) = ckpts.save(state, &tensors, &opt.state_tensors(), 1)?;
    let write_s = t1.elapsed().as_secs_f64();
    let t2 = Instant::now();
    CheckpointDir::load_from(&path, &b.device)?;
    let load_s = t2.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);

    Ok(BenchTrainResult {
        impl_name: "bitllama-rs (candle)",
        dim: b.model.dim,
        layers: b.model.n_layers,
        heads: b.model.n_heads,
        mixer: b.model.mixer.to_string(),
        weights: b.model.weights.to_string(),
        batch: b.batch,
        ctx: b.ctx,
        params: b.model.param_count(),
        steps: b.steps,
        ms_per_step: dt * 1000.0 / b.steps as f64,
        forward_ms: per_step_ms(phases[0]),
        backward_ms: per_step_ms(phases[1]),
        optimizer_ms: per_step_ms(phases[2]),
        tokens_per_s: (b.batch * b.ctx * b.steps) as f64 / dt,
        peak_mem_bytes: peak_rss_bytes(),
        checkpoint_bytes: bytes,
        checkpoint_write_s: write_s,
        checkpoint_load_s: load_s,
        threads: candle_core::utils::get_num_threads(),
    })
}

/// Mixer and weights from the peer's `--arch` names as well as ours.
pub fn parse_arch(arch: &str) -> Option<(MixerKind, WeightKind)> {
    match arch {
        "bitttt" | "ttt" => Some((MixerKind::Ttt, WeightKind::Ternary)),
        "llama" => Some((MixerKind::Attention, WeightKind::Float)),
        "bitattention" | "attention" => Some((MixerKind::Attention, WeightKind::Ternary)),
        "floatttt" => Some((MixerKind::Ttt, WeightKind::Float)),
        _ => None,
    }
}
