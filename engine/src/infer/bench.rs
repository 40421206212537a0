//! `engine bench-generate`: batch-1 prompt and decode speed of the packed ternary path against the f32 path
//! (the same already-quantized weights held as γ·W̃ in f32 and multiplied with f32 dot products, as a float
//! engine would) on one model with random weights, plus the bytes of weights each holds.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::model::InferenceModel;
use super::packed::Kernel;
use super::sampler::argmax;
use super::weights::{LinearMode, ModelWeights};
use crate::model::{build_seeded, ModelConfig};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchGenerate {
    pub model: ModelConfig,
    /// Decoded tokens timed.
    pub tokens: usize,
    pub prompt_tokens: usize,
    pub seed: u64,
    /// Packed path with f32 embedding and head (default: int8, as `generate` runs).
    pub f32_tables: bool,
    /// Attention window (as `generate` applies the trained context), attention models only.
    pub window: Option<usize>,
}

#[derive(Debug, Serialize)]
pub struct BenchGenerateResult {
    pub impl_name: &'static str,
    pub dim: usize,
    pub layers: usize,
    pub heads: usize,
    pub vocab: usize,
    pub mixer: String,
    pub params: usize,
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    /// Attention window, if any.
    pub window: Option<usize>,
    pub threads: usize,
    /// Integer kernel of the packed path.
    pub kernel: &'static str,
    /// Decode rates (tokens/s, batch 1).
    pub packed_tokens_per_s: f64,
    pub f32_tokens_per_s: f64,
    pub decode_speedup: f64,
    /// Prompt (prefill) rates.
    pub packed_prompt_tokens_per_s: f64,
    pub f32_prompt_tokens_per_s: f64,
    pub prompt_speedup: f64,
    /// All weights in memory (block linears + embedding, head, norms, TTT parameters in f32).
    pub packed_weight_bytes: usize,
    pub f32_weight_bytes: usize,
    pub weight_memory_ratio: f64,
    /// Block linears only (the ternary weights).
    pub packed_linear_bytes: usize,
    pub f32_linear_bytes: usize,
    pub linear_memory_ratio: f64,
    /// max |logits_packed − logits_f32| / max |logits_f32| after the prompt.
    pub prompt_logits_rel_diff: f64,
    /// Fraction of decode steps where both paths picked the same greedy token.
    pub greedy_agreement: f64,
}

struct Timing {
    prompt_s: f64,
    decode_s: f64,
    prompt_logits: Vec<f32>,
    tokens: Vec<u32>,
}

fn time_model(m: &InferenceModel, prompt: &[u32], n: usize) -> Result<Timing> {
    // Warm up: caches, thread pool, allocator.
    let mut st = m.new_state();
    let l = m.forward(&prompt[..prompt.len().min(8)], &mut st, false)?;
    m.forward(&[argmax(&l)], &mut st, false)?;

    let mut st = m.new_state();
    let t0 = Instant::now();
    let mut logits = m.forward(prompt, &mut st, false)?;
    let prompt_s = t0.elapsed().as_secs_f64();
    let prompt_logits = logits.clone();
    let mut tokens = Vec::with_capacity(n);
    let t1 = Instant::now();
    for _ in 0..n {
        let next = argmax(&logits);
        tokens.push(next);
        logits = m.forward(&[next], &mut st, false)?;
    }
    Ok(Timing {
        prompt_s,
        decode_s: t1.elapsed().as_secs_f64(),
        prompt_logits,
        tokens,
    })
}

pub fn bench_generate(b: &BenchGenerate) -> Result<BenchGenerateResult> {
    b.model.validate()?;
    let cfg = &b.model;
    let (packed, f32m) = {
        let (varmap, _) = build_seeded(cfg, b.seed, DType::F32, &Device::Cpu)?;
        let tensors: HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .expect("varmap lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        // What `engine generate` runs on CPU: packed linears, int8 embedding and head.
        let packed = InferenceModel::new(ModelWeights::from_tensors(
            cfg,
            &tensors,
            LinearMode::Packed,
        )?)?;
        let packed = if b.f32_tables {
            packed
        } else {
            packed.with_int8_tables()
        }
        .with_window(b.window);
        let f32m = InferenceModel::new(ModelWeights::from_tensors(
            cfg,
            &tensors,
            LinearMode::Dequantized,
        )?)?
        .with_window(b.window);
        (packed, f32m)
    };
    let mut rng = ChaCha8Rng::seed_from_u64(b.seed ^ 0x5eed);
    let prompt: Vec<u32> = (0..b.prompt_tokens.max(1))
        .map(|_| rng.gen_range(0..cfg.vocab_size as u32))
        .collect();
    let n = b.tokens.max(1);
    let tp = time_model(&packed, &prompt, n)?;
    let tf = time_model(&f32m, &prompt, n)?;
    let (packed_total, packed_lin) = packed.weight_bytes();
    let (f32_total, f32_lin) = f32m.weight_bytes();
    let scale = tf
        .prompt_logits
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(1e-12);
    let diff = tp
        .prompt_logits
        .iter()
        .zip(&tf.prompt_logits)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let agree = tp
        .tokens
        .iter()
        .zip(&tf.tokens)
        .filter(|(a, b)| a == b)
        .count();
    let rate = |k: usize, s: f64| k as f64 / s.max(1e-12);
    let (pd, fd) = (rate(n, tp.decode_s), rate(n, tf.decode_s));
    let (pp, fp) = (
        rate(prompt.len(), tp.prompt_s),
        rate(prompt.len(), tf.prompt_s),
    );
    Ok(BenchGenerateResult {
        impl_name: "bitllama-rs generate (packed ternary + int8 tables vs f32)",
        dim: cfg.dim,
        layers: cfg.n_layers,
        heads: cfg.n_heads,
        vocab: cfg.vocab_size,
        mixer: cfg.mixer.to_string(),
        params: cfg.param_count(),
        prompt_tokens: prompt.len(),
        decode_tokens: n,
        window: b.window,
        threads: rayon::current_num_threads(),
        kernel: Kernel::detect().name(),
        packed_tokens_per_s: pd,
        f32_tokens_per_s: fd,
        decode_speedup: pd / fd,
        packed_prompt_tokens_per_s: pp,
        f32_prompt_tokens_per_s: fp,
        prompt_speedup: pp / fp,
        packed_weight_bytes: packed_total,
        f32_weight_bytes: f32_total,
        weight_memory_ratio: packed_total as f64 / f32_total as f64,
        packed_linear_bytes: packed_lin,
        f32_linear_bytes: f32_lin,
        linear_memory_ratio: packed_lin as f64 / f32_lin as f64,
        prompt_logits_rel_diff: (diff / scale) as f64,
        greedy_agreement: agree as f64 / n as f64,
    })
}

/// A human-readable summary of a result.
pub fn format_table(r: &BenchGenerateResult) -> String {
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    format!(
        "model: dim {} × {} layers, {} heads, vocab {}, {} mixer, {} params; {} threads, kernel {}\n\
         {:<28}{:>14}{:>14}{:>10}\n\
         {:<28}{:>14.1}{:>14.1}{:>9.2}×\n\
         {:<28}{:>14.1}{:>14.1}{:>9.2}×\n\
         {:<28}{:>14.1}{:>14.1}{:>9.3}\n\
         {:<28}{:>14.1}{:>14.1}{:>9.3}\n\
         prompt logits rel diff packed vs f32: {:.2e}; greedy agreement {:.0}%",
        r.dim,
        r.layers,
        r.heads,
        r.vocab,
        r.mixer,
        r.params,
        r.threads,
        r.kernel,
        "",
        "packed",
        "f32",
        "ratio",
        format!("decode tokens/s ({} tok)", r.decode_tokens),
        r.packed_tokens_per_s,
        r.f32_tokens_per_s,
        r.decode_speedup,
        format!("prompt tokens/s ({} tok)", r.prompt_tokens),
        r.packed_prompt_tokens_per_s,
        r.f32_prompt_tokens_per_s,
        r.prompt_speedup,
        "weights in memory (MiB)",
        mib(r.packed_weight_bytes),
        mib(r.f32_weight_bytes),
        r.weight_memory_ratio,
        "block linears (MiB)",
        mib(r.packed_linear_bytes),
        mib(r.f32_linear_bytes),
        r.linear_memory_ratio,
        r.prompt_logits_rel_diff,
        100.0 * r.greedy_agreement,
    )
}
