//! Inference: `engine generate`, `engine export`, `engine bench-generate`.
//!
//! A trained model is loaded from a run dir, a checkpoint dir or an exported file ([`source`]), its ternary
//! linears quantized once and packed at 2 bits per weight ([`packed`], after BitNet b1.58 and bitnet.cpp),
//! and run recurrently at batch 1 by [`model::InferenceModel`]: TTT layers step their carried hidden state
//! token by token (O(1) memory per token), attention layers keep a KV cache. Tokens are sampled
//! ([`sampler`]) and streamed to stdout as text as soon as they decode. On CUDA the training model itself
//! (`BitLlama::forward_with_state`, no autograd variables) runs instead.

pub mod bench;
pub mod export;
pub mod float;
pub mod model;
pub mod packed;
pub mod sampler;
pub mod source;
pub mod tables;
pub mod weights;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use tokenizers::Tokenizer;

use crate::model::{BitLlama, ModelState};
pub use model::{InferState, InferenceModel};
pub use sampler::{Sampler, SamplerConfig};
pub use source::Source;
pub use weights::{LinearMode, ModelWeights};

/// Something that turns tokens into next-token logits, carrying its own sequence state.
pub trait Decoder {
    /// Forget the sequence (start a new one).
    fn reset(&mut self);
    /// Feed tokens continuing the sequence; the logits after the last one.
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>>;
}

/// The packed (or f32) inference model with its state.
pub struct PackedDecoder {
    pub model: InferenceModel,
    state: InferState,
}

impl PackedDecoder {
    pub fn new(model: InferenceModel) -> Self {
        let state = model.new_state();
        Self { model, state }
    }
}

impl Decoder for PackedDecoder {
    fn reset(&mut self) {
        self.state = self.model.new_state();
    }

    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.model.forward(tokens, &mut self.state, false)
    }
}

/// The training model on a candle device (CUDA), fed through `forward_with_state`.
pub struct CandleDecoder {
    model: BitLlama,
    state: Option<ModelState>,
    device: Device,
    /// Attention window (see `InferenceModel::with_window`); applied between feeds.
    window: Option<usize>,
}

impl CandleDecoder {
    /// Build the training model from latent tensors on `device`; plain tensors, no autograd variables.
    pub fn new(
        cfg: &crate::model::ModelConfig,
        tensors: std::collections::HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        Ok(Self {
            model: BitLlama::new(cfg, vb)?,
            state: None,
            device: device.clone(),
            window: None,
        })
    }

    /// Attend to at most `window` most recent tokens (applied between `feed` calls; a chunk that would
    /// cross the window is fed token by token).
    pub fn with_window(mut self, window: Option<usize>) -> Self {
        self.window = window.filter(|w| *w > 0);
        self
    }
}

impl Decoder for CandleDecoder {
    fn reset(&mut self) {
        self.state = None;
    }

    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        // A chunk that would run past the window within itself goes token by token, so that every query
        // sees exactly the window (as the packed backend does).
        let cached = self.state.as_ref().map_or(0, |st| {
            st.iter()
                .find_map(|s| match s {
                    crate::model::block::MixerState::Attention(kv) => Some(kv.len()),
                    _ => None,
                })
                .unwrap_or(0)
        });
        if let Some(w) = self.window {
            if tokens.len() > 1 && cached + tokens.len() > w {
                let mut last = Vec::new();
                for t in tokens {
                    last = self.feed(std::slice::from_ref(t))?;
                }
                return Ok(last);
            }
        }
        let ids = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let (logits, mut state) = self.model.forward_with_state(&ids, self.state.take())?;
        if let Some(w) = self.window {
            // The next token attends to the kept keys and to itself: w in all.
            for s in &mut state {
                if let crate::model::block::MixerState::Attention(kv) = s {
                    kv.keep_last(w - 1)?;
                }
            }
        }
        self.state = Some(state);
        let t = tokens.len();
        Ok(logits
            .narrow(1, t - 1, 1)?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1()?)
    }
}

/// What one generation did.
#[derive(Debug, Clone, Default)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub generated: usize,
    pub prompt_s: f64,
    pub decode_s: f64,
    /// Generation ended on the end-of-text token (not on the limit).
    pub hit_eot: bool,
}

/// Generate up to `max_tokens` after `prompt` (text), streaming decoded text to `out` (flushed per token).
/// The prompt is preceded by the end-of-text id, as every story in the training data is.
pub fn generate_text(
    decoder: &mut dyn Decoder,
    tokenizer: &Tokenizer,
    sampler: &mut Sampler,
    prompt: &str,
    max_tokens: usize,
    out: &mut dyn Write,
) -> Result<(Vec<u32>, GenStats)> {
    let enc = tokenizer
        .encode(prompt, false)
        .map_err(|e| anyhow::anyhow!("encoding the prompt: {e}"))?;
    let mut ids = vec![data_prep::EOT_ID];
    ids.extend_from_slice(enc.get_ids());
    decoder.reset();
    sampler.reset();
    let mut stats = GenStats {
        prompt_tokens: ids.len(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut logits = decoder.feed(&ids)?;
    stats.prompt_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut stream = tokenizer.decode_stream(false);
    let mut generated = Vec::new();
    for i in 0..max_tokens {
        if logits.iter().any(|v| !v.is_finite()) {
            anyhow::bail!("the model produced non-finite logits after {i} generated token(s): the checkpoint's weights are not finite (a diverged run?); try an earlier checkpoint dir");
        }
        // Padding never occurs in training text: never emit it (it would print as `<|padding|>`).
        if let Some(pad) = logits.get_mut(data_prep::PAD_ID as usize) {
            *pad = f32::NEG_INFINITY;
        }
        let next = sampler.sample(&logits);
        if next == data_prep::EOT_ID {
            stats.hit_eot = true;
            break;
        }
        generated.push(next);
        if let Some(text) = stream
            .step(next)
            .map_err(|e| anyhow::anyhow!("decoding token {next}: {e}"))?
        {
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
        if i + 1 < max_tokens {
            logits = decoder.feed(&[next])?;
        }
    }
    stats.generated = generated.len();
    stats.decode_s = t1.elapsed().as_secs_f64();
    Ok((generated, stats))
}

/// `engine generate` settings.
#[derive(Debug, Clone)]
pub struct GenerateArgs {
    pub checkpoint: PathBuf,
    /// `None`: interactive, prompts read from stdin line by line.
    pub prompt: Option<String>,
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    pub device: String,
    /// CPU: embedding and head in f32 rather than int8.
    pub f32_tables: bool,
}

/// Load the model named by `--checkpoint` as a decoder for `device` (on CPU: packed ternary linears, and
/// int8 embedding and head unless `f32_tables`).
pub fn load_decoder(
    path: &Path,
    device: &str,
    f32_tables: bool,
) -> Result<(Box<dyn Decoder>, Tokenizer, String)> {
    let device = crate::device::device_from_name(device)?;
    let src = Source::load(path)?;
    let desc = src.description.clone();
    let tokenizer = src.tokenizer.clone();
    // Only attention layers have a window (TTT layers carry a fixed-size state).
    let window = src
        .context_len
        .filter(|_| src.config().mixer == crate::model::MixerKind::Attention);
    let decoder: Box<dyn Decoder> = if device.is_cpu() {
        let weights = src.into_weights(LinearMode::Packed)?;
        let model = InferenceModel::new(weights)?;
        let model = if f32_tables {
            model
        } else {
            model.with_int8_tables()
        };
        Box::new(PackedDecoder::new(model.with_window(window)))
    } else {
        let tensors = src.latent_tensors(&device)?;
        Box::new(CandleDecoder::new(src.config(), tensors, &device)?.with_window(window))
    };
    Ok((decoder, tokenizer, desc))
}

fn log_stats(s: &GenStats) {
    tracing::info!(
        "{} prompt tokens in {:.3} s, {} generated in {:.3} s ({:.1} tokens/s){}",
        s.prompt_tokens,
        s.prompt_s,
        s.generated,
        s.decode_s,
        s.generated as f64 / s.decode_s.max(1e-9),
        if s.hit_eot {
            ", stopped at end of text"
        } else {
            ""
        }
    );
}

/// Run `engine generate`: one prompt, or interactive prompts from `input` until EOF or `/quit`. A closed
/// stdout (e.g. `| head`) ends it quietly.
pub fn run_generate(
    args: &GenerateArgs,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<()> {
    match run_generate_inner(args, input, out) {
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        r => r,
    }
}

fn run_generate_inner(
    args: &GenerateArgs,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<()> {
    args.sampler.validate()?;
    let (mut decoder, tokenizer, desc) =
        load_decoder(&args.checkpoint, &args.device, args.f32_tables)?;
    tracing::info!("generating from {desc}");
    let mut sampler = Sampler::new(args.sampler);
    // One prompt in, its continuation streamed out and ended with a newline.
    let mut respond = |prompt: &str, out: &mut dyn Write| -> Result<()> {
        let (_, stats) = generate_text(
            decoder.as_mut(),
            &tokenizer,
            &mut sampler,
            prompt,
            args.max_tokens,
            out,
        )?;
        writeln!(out)?;
        out.flush()?;
        log_stats(&stats);
        Ok(())
    };
    if let Some(prompt) = &args.prompt {
        return respond(prompt, out);
    }
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    if interactive {
        eprintln!("Type a prompt and press Enter; /quit or Ctrl-D ends.");
    }
    let mut line = String::new();
    loop {
        if interactive {
            eprint!("> ");
        }
        line.clear();
        if input
            .read_line(&mut line)
            .context("reading a prompt from stdin")?
            == 0
        {
            break;
        }
        let prompt = line.trim_end_matches(['\n', '\r']);
        if prompt.trim() == "/quit" {
            break;
        }
        if prompt.trim().is_empty() {
            continue;
        }
        respond(prompt, out)?;
    }
    Ok(())
}

/// Run `engine export`: write the packed model and its tokenizer to `out_path`; returns a one-line summary.
pub fn run_export(checkpoint: &Path, out_path: &Path) -> Result<String> {
    if out_path.is_dir() {
        bail!(
            "--out {} is a directory: name the file to write",
            out_path.display()
        );
    }
    let src = Source::load(checkpoint)?;
    let desc = src.description.clone();
    let tok = src.tokenizer_json.clone();
    let context_len = src.context_len;
    let weights = src.into_weights(LinearMode::Packed)?;
    let (lin, total) = weights.bytes();
    let bytes = export::write(out_path, &weights, &tok, &desc, context_len)?;
    Ok(format!(
        "exported {desc} to {} ({bytes} bytes; weights {total} bytes, of which packed linears {lin})",
        out_path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{build_seeded, MixerKind, ModelConfig, WeightKind};

    /// A 2-layer D=32 ternary model with seeded weights: its config and latent tensors.
    type Tensors = std::collections::HashMap<String, Tensor>;

    fn tiny(mixer: MixerKind) -> Result<(ModelConfig, Tensors)> {
        tiny_shaped(mixer, 32, 2, 64)
    }

    /// A 2-layer model of width `dim` with `n_heads` heads and an MLP of `hidden`, seeded weights.
    fn tiny_shaped(
        mixer: MixerKind,
        dim: usize,
        n_heads: usize,
        hidden: usize,
    ) -> Result<(ModelConfig, Tensors)> {
        let cfg = ModelConfig {
            vocab_size: 50,
            dim,
            n_layers: 2,
            n_heads,
            mixer,
            weights: WeightKind::Ternary,
            mlp_hidden: Some(hidden),
            ttt_mini_batch: 4,
            ttt_base_lr: 1.0,
            tie_embeddings: false,
            ..Default::default()
        };
        let (vm, _) = build_seeded(&cfg, 9, DType::F32, &Device::Cpu)?;
        let tensors = vm
            .data()
            .lock()
            .expect("lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        Ok((cfg, tensors))
    }

    fn max_abs(a: &[f32]) -> f32 {
        a.iter().fold(0f32, |m, v| m.max(v.abs()))
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
    }

    /// The candle backend (the training model, used on CUDA) gives the packed model's logits, from a
    /// checkpoint's latent weights and from packed weights turned back into latent ones (exported files);
    /// also at widths that are no multiple of the SIMD widths (24 wide, 3 heads of 8, an MLP of 40), where
    /// the kernels' padding and the 8-wide sums' tails run.
    #[test]
    fn candle_backend_matches_packed_backend() -> Result<()> {
        for (mixer, dim, heads, hidden) in [
            (MixerKind::Ttt, 32, 2, 64),
            (MixerKind::Attention, 32, 2, 64),
            (MixerKind::Ttt, 24, 3, 40),
            (MixerKind::Attention, 20, 2, 36),
        ] {
            let (cfg, tensors) = tiny_shaped(mixer, dim, heads, hidden)?;
            let weights = ModelWeights::from_tensors(&cfg, &tensors, LinearMode::Packed)?;
            let from_packed = weights.latent_tensors(&Device::Cpu)?;
            let mut packed = PackedDecoder::new(InferenceModel::new(weights)?);
            let mut candle = CandleDecoder::new(&cfg, tensors, &Device::Cpu)?;
            let mut rebuilt = CandleDecoder::new(&cfg, from_packed, &Device::Cpu)?;
            let prompt = [0u32, 5, 17, 3, 42, 8];
            let mut feeds: Vec<&[u32]> = vec![&prompt];
            feeds.extend([[7u32], [1], [33]].iter().map(|t| t.as_slice()));
            for toks in feeds {
                let a = packed.feed(toks)?;
                let scale = max_abs(&a);
                for other in [&mut candle, &mut rebuilt] {
                    let diff = max_diff(&a, &other.feed(toks)?);
                    assert!(
                        diff <= 1e-3 * scale,
                        "{mixer} dim {dim}: diff {diff} (scale {scale})"
                    );
                }
            }
        }
        Ok(())
    }

    /// With an attention window of 4, both backends fed token by token agree past the window, and differ
    /// from the unwindowed model there (the window is really applied).
    #[test]
    fn attention_window_is_the_same_on_both_backends() -> Result<()> {
        let (cfg, tensors) = tiny(MixerKind::Attention)?;
        let packed_model = || -> Result<InferenceModel> {
            InferenceModel::new(ModelWeights::from_tensors(
                &cfg,
                &tensors,
                LinearMode::Packed,
            )?)
        };
        let mut windowed = PackedDecoder::new(packed_model()?.with_window(Some(4)));
        let mut full = PackedDecoder::new(packed_model()?);
        let mut candle =
            CandleDecoder::new(&cfg, tensors.clone(), &Device::Cpu)?.with_window(Some(4));
        // A 7-token prompt in one chunk (longer than the window) on both.
        let prompt = [3u32, 9, 27, 4, 11, 2, 40];
        let (a, b) = (windowed.feed(&prompt)?, candle.feed(&prompt)?);
        let (scale, diff) = (max_abs(&a), max_diff(&a, &b));
        assert!(diff <= 1e-3 * scale, "prompt: diff {diff} (scale {scale})");
        windowed.reset();
        candle.reset();
        let mut max_gap = 0f32;
        for (i, tok) in [0u32, 5, 17, 3, 42, 8, 7, 1, 33, 12].iter().enumerate() {
            let a = windowed.feed(&[*tok])?;
            let b = candle.feed(&[*tok])?;
            let c = full.feed(&[*tok])?;
            let (scale, diff) = (max_abs(&a), max_diff(&a, &b));
            assert!(
                diff <= 1e-3 * scale,
                "token {i}: diff {diff} (scale {scale})"
            );
            let gap = max_diff(&a, &c);
            if i < 4 {
                let scale = max_abs(&c);
                assert!(
                    gap <= 1e-6 * scale,
                    "token {i}: inside the window nothing changes ({gap})"
                );
            }
            max_gap = max_gap.max(gap);
        }
        assert!(max_gap > 1e-4, "the window changed nothing");
        // Memory stays bounded: 4 positions of K and V per attention layer.
        assert_eq!(windowed.state.floats(), 2 * 2 * 4 * 32);

        // A window of one token (context_len = 1) is a window too, on both backends.
        let mut one = PackedDecoder::new(packed_model()?.with_window(Some(1)));
        let mut candle_one =
            CandleDecoder::new(&cfg, tensors.clone(), &Device::Cpu)?.with_window(Some(1));
        for tok in [3u32, 9, 27] {
            let (a, b) = (one.feed(&[tok])?, candle_one.feed(&[tok])?);
            let (scale, diff) = (max_abs(&a), max_diff(&a, &b));
            assert!(
                diff <= 1e-3 * scale,
                "window 1: diff {diff} (scale {scale})"
            );
        }
        assert_eq!(one.state.floats(), 2 * 2 * 32);
        Ok(())
    }
}
