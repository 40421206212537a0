//! One Bit-Llama block's training cost in isolation: forward and backward of a block (and of its mixer
//! alone) at D=256, H=4, B=8, T=128 — the shape of `engine bench-train` — for each mixer variant, so the
//! mixers can be compared without the embedding, the head and the optimizer around them.
//!
//!   cargo run --release -p engine --example block_bench -- [VARIANT…]
//!
//! VARIANT: ttt (the authors' TTT-Linear, ternary), legacy, mamba, attention (with BitLinear),
//! attention-float (float weights). Prints one JSON line per variant and part (medians over 25 rounds after 5
//! warm-up rounds, and the fastest round).

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use engine::model::ttt_linear::TttLinear;
use engine::model::{attention::Attention, Backbone, Block, MixerKind, ModelConfig, WeightKind};

type Forward = Box<dyn Fn(&Tensor) -> Result<Tensor>>;

fn config(variant: &str) -> Option<ModelConfig> {
    let base = ModelConfig {
        dim: 256,
        n_heads: 4,
        ..Default::default()
    };
    Some(match variant {
        "ttt" => base,
        "legacy" => base.legacy(),
        "mamba" => ModelConfig {
            ttt_backbone: Backbone::Mamba,
            ..base
        },
        "attention" => ModelConfig {
            mixer: MixerKind::Attention,
            ..base
        },
        "attention-float" => ModelConfig {
            mixer: MixerKind::Attention,
            weights: WeightKind::Float,
            ..base
        },
        _ => return None,
    })
}

/// Median and fastest forward and backward times (ms) of `f` on x (B,T,D), through the loss Σ f(x)².
fn time(f: &Forward, x: &Tensor) -> Result<[f64; 4]> {
    let x = Var::from_tensor(x)?;
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    for round in 0..30 {
        let t0 = Instant::now();
        let loss = f(x.as_tensor())?.sqr()?.sum_all()?;
        loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        grads
            .get(x.as_tensor())
            .expect("∂x")
            .sum_all()?
            .to_scalar::<f32>()?;
        let t2 = Instant::now();
        if round >= 5 {
            fwd.push((t1 - t0).as_secs_f64() * 1e3);
            bwd.push((t2 - t1).as_secs_f64() * 1e3);
        }
    }
    let stats = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0])
    };
    let ((fm, ff), (bm, bf)) = (stats(&mut fwd), stats(&mut bwd));
    Ok([fm, ff, bm, bf])
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let mut variants: Vec<String> = std::env::args().skip(1).collect();
    if variants.is_empty() {
        variants = ["ttt", "legacy", "mamba", "attention", "attention-float"]
            .map(String::from)
            .to_vec();
    }
    let x = engine::model::init::seeded_randn(1, 0.0, 1.0, (8, 128, 256), DType::F32, &dev)?;
    for variant in &variants {
        let Some(cfg) = config(variant) else {
            eprintln!(
                "unknown variant {variant:?}: ttt, legacy, mamba, attention or attention-float"
            );
            std::process::exit(2);
        };
        let vb = |vm: &VarMap| engine::model::init::seeded_var_builder(vm, 7, DType::F32, &dev);
        let (vm_block, vm_mixer) = (VarMap::new(), VarMap::new());
        let block = Block::new(&cfg, 0.02, 0.02, vb(&vm_block))?;
        let mixer: Forward = match cfg.mixer {
            MixerKind::Ttt => {
                let m = TttLinear::new(&cfg, 0.02, 0.02, vb(&vm_mixer))?;
                Box::new(move |x| Ok(m.forward_with_state(x, None)?.0))
            }
            MixerKind::Attention => {
                let m = Attention::new(
                    cfg.dim,
                    cfg.n_heads,
                    cfg.linear_kind(),
                    0.02,
                    0.02,
                    vb(&vm_mixer),
                )?;
                Box::new(move |x| Ok(m.forward_with_cache(x, None)?.0))
            }
        };
        let block: Forward = Box::new(move |x| Ok(block.forward_with_state(x, None)?.0));
        for (part, f) in [("block", &block), ("mixer", &mixer)] {
            let [fm, ff, bm, bf] = time(f, &x)?;
            println!(
                "{{\"variant\":\"{variant}\",\"part\":\"{part}\",\"forward_ms\":{fm:.3},\"forward_fastest_ms\":{ff:.3},\"backward_ms\":{bm:.3},\"backward_fastest_ms\":{bf:.3}}}"
            );
        }
    }
    Ok(())
}
