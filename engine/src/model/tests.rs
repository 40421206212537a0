//! Whole-model tests: parameter count, causality, chunked state, finite-difference gradient check.

use super::ttt_linear::max_rel_diff;
use super::*;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarMap;

fn tiny(mixer: MixerKind, weights: WeightKind) -> ModelConfig {
    ModelConfig {
        vocab_size: 37,
        dim: 16,
        n_layers: 2,
        n_heads: 2,
        mixer,
        weights,
        mlp_hidden: Some(24),
        ttt_mini_batch: 4,
        ttt_base_lr: 1.0,
        tie_embeddings: false,
        ..Default::default()
    }
}

fn build(cfg: &ModelConfig, dtype: DType) -> Result<(VarMap, BitLlama)> {
    let varmap = VarMap::new();
    let vb = crate::model::init::seeded_var_builder(&varmap, 7, dtype, &Device::Cpu);
    let model = BitLlama::new(cfg, vb)?;
    Ok((varmap, model))
}

fn ids(b: usize, t: usize, vocab: u32, seed: u32) -> Result<Tensor> {
    let v: Vec<u32> = (0..(b * t) as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed * 97)) % vocab)
        .collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu)
}

#[test]
fn param_count_equals_varmap_elements() -> Result<()> {
    for mixer in [MixerKind::Ttt, MixerKind::Attention] {
        for tie in [false, true] {
            let cfg = ModelConfig {
                tie_embeddings: tie,
                ..tiny(mixer, WeightKind::Ternary)
            };
            let (varmap, _) = build(&cfg, DType::F32)?;
            let n: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
            assert_eq!(cfg.param_count(), n, "{mixer} tie={tie}");
        }
    }
    Ok(())
}

/// The FLOPs formula against a count from the built model itself: 6 FLOPs per token for each weight of
/// every matrix the model multiplies by (read off the VarMap's shapes: 2-D weights other than the
/// embedding lookup, the head's tied matrix once more), plus the sequence mixing enumerated matmul by
/// matmul (attention: QKᵀ and AV over the context; TTT's dual form per mini-batch: K·W, Q·W, QKᵀ, S·G and
/// Kᵀ·G), forward + backward = 3 × forward. Within 2% (the formula leaves out the 1-D weights' work).
#[test]
fn flops_per_token_match_a_count_from_the_model() -> Result<()> {
    for (mixer, backbone, tie) in [
        (MixerKind::Ttt, crate::model::Backbone::Transformer, false),
        (MixerKind::Ttt, crate::model::Backbone::Mamba, true),
        (
            MixerKind::Attention,
            crate::model::Backbone::Transformer,
            false,
        ),
    ] {
        let cfg = ModelConfig {
            tie_embeddings: tie,
            ttt_backbone: backbone,
            ..tiny(mixer, WeightKind::Ternary)
        };
        let context = 32usize;
        let (varmap, _) = build(&cfg, DType::F32)?;
        let data = varmap.data().lock().expect("varmap").clone();
        let mut matmul_weights = 0usize;
        let mut conv_weights = 0usize;
        for (name, var) in &data {
            let dims = var.dims().len();
            if name == "embed.weight" {
                if tie {
                    matmul_weights += var.elem_count();
                }
            } else if name.contains("conv") && dims == 2 {
                conv_weights += var.elem_count();
            } else if dims == 2 && !name.contains("ttt_norm") && !name.contains("offset") {
                matmul_weights += var.elem_count();
            }
        }
        let (d, h, t, n) = (
            cfg.dim as f64,
            cfg.n_heads as f64,
            context as f64,
            cfg.n_layers as f64,
        );
        let hd = d / h;
        let b = cfg.ttt_mini_batch as f64;
        let sequence = match mixer {
            // QKᵀ (T×hd · hd×T) and AV (T×T · T×hd) per head, per token of T.
            MixerKind::Attention => h * (2.0 * t * hd + 2.0 * t * hd),
            // Per mini-batch of b per head: K·W, Q·W (b×hd · hd×hd), QKᵀ (b×hd · hd×b), S·G (b×b · b×hd),
            // Kᵀ·G (hd×b · b×hd); divided by b tokens.
            MixerKind::Ttt => {
                h * (2.0 * b * hd * hd * 2.0
                    + 2.0 * b * b * hd
                    + 2.0 * b * b * hd
                    + 2.0 * hd * b * hd)
                    / b
            }
        };
        // (The per-head initial state W0, H×hd×hd, is 3-D: no per-token matmul of its own.)
        let counted =
            3.0 * (2.0 * matmul_weights as f64 + 2.0 * conv_weights as f64 + n * sequence);
        let formula = cfg.flops_per_token(context);
        let rel = (formula - counted).abs() / counted;
        assert!(
            rel < 0.02,
            "{mixer} {backbone:?}: formula {formula} vs counted {counted} ({rel:.4})"
        );
    }
    Ok(())
}

#[test]
fn outputs_are_causal_for_both_mixers() -> Result<()> {
    for mixer in [MixerKind::Ttt, MixerKind::Attention] {
        let cfg = tiny(mixer, WeightKind::Ternary);
        let (_vm, model) = build(&cfg, DType::F32)?;
        let a = ids(2, 11, 37, 1)?;
        let logits_a = model.forward(&a)?;
        for t in [0usize, 3, 4, 9] {
            // Change every token after t.
            let head = a.narrow(1, 0, t + 1)?;
            let tail = ids(2, 10 - t, 37, 7 + t as u32)?;
            let b = if t < 10 {
                Tensor::cat(&[&head, &tail], 1)?
            } else {
                head
            };
            let logits_b = model.forward(&b)?;
            let rel = max_rel_diff(
                &logits_a.narrow(1, 0, t + 1)?,
                &logits_b.narrow(1, 0, t + 1)?,
            )?;
            assert!(
                rel == 0.0,
                "{mixer}: changing tokens after {t} changed earlier outputs ({rel})"
            );
        }
    }
    Ok(())
}

#[test]
fn chunked_forward_with_state_equals_one_call() -> Result<()> {
    for mixer in [MixerKind::Ttt, MixerKind::Attention] {
        let cfg = tiny(mixer, WeightKind::Float);
        let (_vm, model) = build(&cfg, DType::F64)?;
        let x = ids(2, 13, 37, 3)?;
        let whole = model.forward(&x)?;
        let (a, s) = model.forward_with_state(&x.narrow(1, 0, 6)?, None)?;
        let (b, _) = model.forward_with_state(&x.narrow(1, 6, 7)?, Some(s))?;
        let rel = max_rel_diff(&whole, &Tensor::cat(&[a, b], 1)?)?;
        assert!(rel < 1e-10, "{mixer}: rel diff {rel}");
    }
    Ok(())
}

/// Finite differences in f64 against autograd on a tiny float model, for both mixers.
#[test]
fn gradients_match_finite_differences() -> Result<()> {
    for mixer in [MixerKind::Ttt, MixerKind::Attention] {
        let cfg = tiny(mixer, WeightKind::Float);
        let (varmap, model) = build(&cfg, DType::F64)?;
        let x = ids(2, 7, 37, 5)?;
        let y = ids(2, 7, 37, 11)?;
        let loss_of = |m: &BitLlama| -> Result<Tensor> {
            let logits = m.forward(&x)?;
            candle_nn::loss::cross_entropy(&logits.reshape((14, 37))?, &y.flatten_all()?)
        };
        let loss = loss_of(&model)?;
        let grads = loss.backward()?;
        let data = varmap.data().lock().expect("varmap lock").clone();
        let mut names: Vec<_> = data.keys().cloned().collect();
        names.sort();
        let mut checked = 0;
        for name in names {
            let var = &data[&name];
            let g = grads
                .get(var.as_tensor())
                .expect("every parameter gets a gradient");
            let g: Vec<f64> = g.flatten_all()?.to_vec1()?;
            let orig = var.as_tensor().copy()?;
            let flat: Vec<f64> = orig.flatten_all()?.to_vec1()?;
            // Probe the two largest-gradient entries of every tensor.
            let mut idx: Vec<usize> = (0..g.len()).collect();
            idx.sort_by(|a, b| g[*b].abs().total_cmp(&g[*a].abs()));
            for &i in idx.iter().take(2) {
                let eps = 1e-6;
                let mut plus = flat.clone();
                plus[i] += eps;
                var.set(&Tensor::from_vec(plus, orig.shape(), &Device::Cpu)?)?;
                let lp = loss_of(&model)?.to_scalar::<f64>()?;
                let mut minus = flat.clone();
                minus[i] -= eps;
                var.set(&Tensor::from_vec(minus, orig.shape(), &Device::Cpu)?)?;
                let lm = loss_of(&model)?.to_scalar::<f64>()?;
                var.set(&orig)?;
                let fd = (lp - lm) / (2.0 * eps);
                let err = (fd - g[i]).abs() / (fd.abs().max(g[i].abs()).max(1e-8));
                assert!(
                    err < 1e-4 || (fd - g[i]).abs() < 1e-9,
                    "{mixer} {name}[{i}]: autograd {} vs finite difference {fd}",
                    g[i]
                );
                checked += 1;
            }
        }
        assert!(checked > 20);
    }
    Ok(())
}

#[test]
fn ternary_model_trains_latent_weights() -> Result<()> {
    let cfg = tiny(MixerKind::Ttt, WeightKind::Ternary);
    let (varmap, model) = build(&cfg, DType::F32)?;
    let x = ids(2, 9, 37, 2)?;
    let logits = model.forward(&x)?;
    let loss = candle_nn::loss::cross_entropy(&logits.reshape((18, 37))?, &x.flatten_all()?)?;
    let grads = loss.backward()?;
    for (name, var) in varmap.data().lock().expect("lock").iter() {
        let g = grads.get(var.as_tensor());
        assert!(g.is_some(), "{name} gets no gradient");
        let g: Vec<f32> = g.expect("checked").flatten_all()?.to_vec1()?;
        assert!(
            g.iter().all(|v| v.is_finite()),
            "{name} has a non-finite gradient"
        );
        if name.ends_with("q.weight") || name.ends_with("gate.weight") {
            assert!(g.iter().any(|v| *v != 0.0), "{name} gradient is all zero");
        }
    }
    Ok(())
}

/// Mixed precision: under autocast (f16 here, as the CPU has no bf16 matmul; CUDA training uses bf16) the
/// whole model's logits and every parameter gradient stay close to f32, and all stay f32 tensors.
#[test]
fn autocast_keeps_the_model_close_to_f32() -> Result<()> {
    for mixer in [MixerKind::Ttt, MixerKind::Attention] {
        let cfg = tiny(mixer, WeightKind::Ternary);
        let (varmap, model) = build(&cfg, DType::F32)?;
        let x = ids(2, 8, 37, 1)?;
        let y = ids(2, 8, 37, 2)?;
        let loss = |m: &BitLlama| -> Result<Tensor> {
            let logits = m.forward(&x)?;
            candle_nn::loss::cross_entropy(&logits.reshape((16, 37))?, &y.flatten_all()?)
        };
        let exact = loss(&model)?;
        let g_exact = exact.backward()?;
        let (half, g_half) = {
            let _cast = precision::Autocast::new(DType::F16);
            let l = loss(&model)?;
            let g = l.backward()?;
            (l, g)
        };
        let (e, h) = (exact.to_scalar::<f32>()?, half.to_scalar::<f32>()?);
        assert!((e - h).abs() < 1e-2 * e.abs(), "{mixer}: loss {h} vs {e}");
        for (name, var) in varmap.data().lock().expect("varmap").iter() {
            let (ge, gh) = (g_exact.get(var.as_tensor()), g_half.get(var.as_tensor()));
            let (Some(ge), Some(gh)) = (ge, gh) else {
                continue;
            };
            assert_eq!(gh.dtype(), DType::F32, "{name}");
            let r = max_rel_diff(gh, ge)?;
            assert!(r < 0.1, "{mixer} {name}: grad rel diff {r}");
        }
    }
    Ok(())
}
