//! AdamW (Loshchilov & Hutter 2019) whose state (moments, step count) can be checkpointed, a warm-up +
//! cosine learning-rate schedule, and global-norm gradient clipping.
//!
//! candle-nn's `AdamW` keeps its moments private, so it cannot be saved; this one follows the same update
//! rule (checked against candle-nn's in a test).

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::cpu_f32;

/// β1, β2, ε of AdamW.
pub const BETA1: f64 = 0.9;
pub const BETA2: f64 = 0.95;
pub const EPS: f64 = 1e-8;

/// One trainable tensor with its AdamW moments.
struct Slot {
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// AdamW over named parameters.
pub struct AdamW {
    slots: BTreeMap<String, Slot>,
    /// Optimizer steps taken so far (bias correction uses it).
    pub step: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
}

/// No weight decay on norms, embeddings, biases and other vectors: only matrices of linears decay.
pub fn decays(name: &str, rank: usize) -> bool {
    rank >= 2
        && !name.starts_with("embed")
        && !name.contains("norm")
        && !name.contains(".ln.")
        && !name.ends_with("b0")
}

impl AdamW {
    /// AdamW over named parameters (any map of name → `Var`: a `VarMap`'s `HashMap` or a `BTreeMap`).
    pub fn new<'a>(
        vars: impl IntoIterator<Item = (&'a String, &'a Var)>,
        weight_decay: f64,
    ) -> Result<Self> {
        Self::with_betas(vars, weight_decay, BETA1, BETA2)
    }

    pub fn with_betas<'a>(
        vars: impl IntoIterator<Item = (&'a String, &'a Var)>,
        weight_decay: f64,
        beta1: f64,
        beta2: f64,
    ) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let t = var.as_tensor();
                Ok((
                    name.clone(),
                    Slot {
                        var: var.clone(),
                        m: t.zeros_like()?,
                        v: t.zeros_like()?,
                        decay: decays(name, t.rank()),
                    },
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            slots,
            step: 0,
            beta1,
            beta2,
            weight_decay,
        })
    }

    /// One update with learning rate `lr` from gradients `grads` (already accumulated and clipped).
    pub fn update(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.update_scaled(grads, lr, 1.0)
    }

    /// One update from gradients `grads` multiplied by `grad_scale` (the clipping factor, applied on the
    /// fly instead of rewriting every gradient first).
    pub fn update_scaled(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        for (name, slot) in self.slots.iter_mut() {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let theta = slot.var.as_tensor();
            let decay = if slot.decay { self.weight_decay } else { 0.0 };
            if theta.device().is_cpu() && theta.dtype() == DType::F32 && g.dtype() == DType::F32 {
                // One fused pass per tensor on CPU (the tensor-op form below makes ~13).
                let g = g.contiguous()?;
                let op = FusedAdamW {
                    beta1: self.beta1 as f32,
                    beta2: self.beta2 as f32,
                    lr: lr as f32,
                    decay: (1.0 - lr * decay) as f32,
                    grad_scale: grad_scale as f32,
                    inv_bc1: (1.0 / bc1) as f32,
                    inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
                };
                // m and v first (they read g), then θ (reads the new m and v).
                let moment = |second| MomentUpdate { c: op, second };
                slot.m
                    .inplace_op2(&g, &moment(false))
                    .and_then(|()| slot.v.inplace_op2(&g, &moment(true)))
                    .and_then(|()| theta.inplace_op3(&slot.m, &slot.v, &ParamUpdate(op)))
                    .with_context(|| format!("AdamW step of {name}"))?;
                continue;
            }
            let g = (g.to_dtype(slot.m.dtype())? * grad_scale)
                .with_context(|| format!("gradient of {name}"))?;
            // m ← β1 m + (1−β1) g ;  v ← β2 v + (1−β2) g²
            slot.m = ((&slot.m * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
            slot.v = ((&slot.v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            // θ ← θ(1 − lr·λ) − lr · m̂ / (√v̂ + ε)
            let m_hat = (&slot.m / bc1)?;
            let v_hat = (&slot.v / bc2)?;
            let theta = if decay > 0.0 {
                (theta * (1.0 - lr * decay))?
            } else {
                theta.clone()
            };
            let next = (theta - (m_hat / (v_hat.sqrt()? + EPS)?)? * lr)?;
            slot.var.set(&next)?;
        }
        Ok(())
    }

    /// Moments as named tensors (`m.NAME`, `v.NAME`) for the checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::with_capacity(self.slots.len() * 2);
        for (name, slot) in &self.slots {
            out.insert(format!("m.{name}"), slot.m.clone());
            out.insert(format!("v.{name}"), slot.v.clone());
        }
        out
    }

    /// Restore moments saved by [`Self::state_tensors`]; every parameter must be present with its shape.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (name, slot) in self.slots.iter_mut() {
            for (prefix, dst) in [("m", &mut slot.m), ("v", &mut slot.v)] {
                let key = format!("{prefix}.{name}");
                let Some(t) = tensors.get(&key) else {
                    bail!("optimizer state has no {key}: the checkpoint is from a different model");
                };
                if t.shape() != dst.shape() {
                    bail!(
                        "optimizer state {key} has shape {:?}, the model needs {:?}",
                        t.dims(),
                        dst.dims()
                    );
                }
                *dst = t.to_dtype(dst.dtype())?.to_device(dst.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The learning-rate schedule of a run (`lr_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// Warm-up, then a cosine decay to `min_lr` over the whole run.
    #[default]
    Cosine,
    /// Warm-up, stable (constant `lr`), decay: the rate stays at `lr` until the last `cooldown_fraction`
    /// of the run, then decays to `min_lr` (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training
    /// Beyond Fixed Training Durations"). The stable phase does not depend on the run's length, so one run
    /// serves every shorter length from its checkpoint where that length's cooldown begins.
    Wsd,
}

/// The shape of a WSD run's cooldown (`cooldown`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Cooldown {
    /// lr − (lr − min_lr)·p over the cooldown's progress p.
    #[default]
    #[serde(rename = "linear")]
    Linear,
    /// min_lr + (lr − min_lr)·(1 − √p), Hägele et al.'s better-performing shape.
    #[serde(rename = "1-sqrt")]
    OneMinusSqrt,
}

/// A run's learning rate by step: the schedule, its rates and lengths.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: LrSchedule,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: u64,
    /// Steps of the whole run; `None` for a run bounded by `max_seconds` alone (constant after warm-up).
    pub horizon: Option<u64>,
    pub cooldown_fraction: f64,
    pub cooldown: Cooldown,
}

impl Schedule {
    /// The first step of a WSD run's cooldown: `horizon − round(cooldown_fraction · horizon)`, never inside
    /// the warm-up; `None` for cosine runs and runs without a horizon.
    pub fn cooldown_start(&self) -> Option<u64> {
        let h = self.horizon?;
        if self.kind != LrSchedule::Wsd {
            return None;
        }
        let decay = (self.cooldown_fraction * h as f64).round() as u64;
        Some(h.saturating_sub(decay).max(self.warmup.min(h)))
    }

    /// The rate of step `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        match self.kind {
            LrSchedule::Cosine => lr_at(step, self.lr, self.min_lr, self.warmup, self.horizon),
            LrSchedule::Wsd => {
                if step < self.warmup {
                    return self.lr * (step + 1) as f64 / self.warmup as f64;
                }
                let (Some(h), Some(start)) = (self.horizon, self.cooldown_start()) else {
                    return self.lr;
                };
                if step < start {
                    return self.lr;
                }
                if step >= h {
                    return self.min_lr;
                }
                let p = (step - start) as f64 / (h - start) as f64;
                let left = match self.cooldown {
                    Cooldown::Linear => 1.0 - p,
                    Cooldown::OneMinusSqrt => 1.0 - p.sqrt(),
                };
                self.min_lr + (self.lr - self.min_lr) * left
            }
        }
    }
}

/// Learning rate at `step` (0-based): linear warm-up to `lr`, then cosine to `min_lr` at `horizon`
/// (constant `lr` after warm-up when the horizon is unknown, i.e. `max_seconds` runs).
pub fn lr_at(step: u64, lr: f64, min_lr: f64, warmup: u64, horizon: Option<u64>) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let Some(h) = horizon else { return lr };
    if step >= h || h <= warmup {
        return min_lr;
    }
    let progress = (step - warmup) as f64 / (h - warmup) as f64;
    min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Global L2 norm of the gradients of `vars`.
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    let mut sq = 0f64;
    for v in vars {
        let Some(g) = grads.get(v.as_tensor()) else {
            continue;
        };
        sq += if g.device().is_cpu() && g.dtype() == DType::F32 {
            // Read in place; partial sums over fixed chunks added in order, so the norm (and the clipping
            // it decides) does not depend on how rayon split the work.
            let g = g.contiguous()?;
            let view = cpu_f32::view(&g);
            let partial: Vec<f64> = view
                .slice("gradient norm")?
                .par_chunks(CHUNK)
                .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                .collect();
            partial.iter().sum::<f64>()
        } else {
            g.sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
        };
    }
    Ok(sq.sqrt())
}

/// The factor that brings a gradient of global norm `norm` down to at most `max_norm` (0 = no clipping).
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// Elements per parallel chunk of the fused CPU loops.
const CHUNK: usize = 1 << 14;

const OP: &str = "fused AdamW";

/// Constants of one fused AdamW step.
#[derive(Clone, Copy)]
struct FusedAdamW {
    beta1: f32,
    beta2: f32,
    lr: f32,
    /// 1 − lr·λ (1 when the tensor does not decay).
    decay: f32,
    grad_scale: f32,
    inv_bc1: f32,
    inv_sqrt_bc2: f32,
}

/// m ← β1 m + (1−β1) g, or with `second`: v ← β2 v + (1−β2) g²  (g already scaled by the clipping factor).
struct MomentUpdate {
    c: FusedAdamW,
    second: bool,
}

/// θ ← θ(1 − lr·λ) − lr · m̂ / (√v̂ + ε)
struct ParamUpdate(FusedAdamW);

impl InplaceOp2 for MomentUpdate {
    fn name(&self) -> &'static str {
        if self.second {
            "adamw-v"
        } else {
            "adamw-m"
        }
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let (m, g) = (
            cpu_f32::slice_mut(dst, dst_l, OP)?,
            cpu_f32::slice(g, gl, OP)?,
        );
        let (second, s) = (self.second, self.c.grad_scale);
        let beta = if second { self.c.beta2 } else { self.c.beta1 };
        m.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(m, g)| {
                for (m, &g) in m.iter_mut().zip(g) {
                    let g = g * s;
                    *m = if second {
                        beta * *m + (1.0 - beta) * g * g
                    } else {
                        beta * *m + (1.0 - beta) * g
                    };
                }
            });
        Ok(())
    }
}

impl InplaceOp3 for ParamUpdate {
    fn name(&self) -> &'static str {
        "adamw-theta"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<()> {
        let theta = cpu_f32::slice_mut(dst, dst_l, OP)?;
        let (m, v) = (cpu_f32::slice(m, ml, OP)?, cpu_f32::slice(v, vl, OP)?);
        let FusedAdamW {
            lr,
            decay,
            inv_bc1,
            inv_sqrt_bc2,
            ..
        } = self.0;
        let eps = EPS as f32;
        theta
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(t, (m, v))| {
                for ((t, &m), &v) in t.iter_mut().zip(m).zip(v) {
                    *t = *t * decay - lr * (m * inv_bc1) / ((v.sqrt() * inv_sqrt_bc2) + eps);
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::{Optimizer, ParamsAdamW};

    #[test]
    fn wsd_is_warm_up_stable_then_cooldown_and_its_stable_phase_ignores_the_length() {
        let wsd = |horizon: u64, cooldown: Cooldown| Schedule {
            kind: LrSchedule::Wsd,
            lr: 1.0,
            min_lr: 0.1,
            warmup: 10,
            horizon: Some(horizon),
            cooldown_fraction: 0.2,
            cooldown,
        };
        let s = wsd(100, Cooldown::Linear);
        assert_eq!(s.cooldown_start(), Some(80));
        assert_eq!(s.at(0), 0.1);
        assert_eq!(s.at(9), 1.0);
        assert_eq!(s.at(10), 1.0);
        assert_eq!(s.at(79), 1.0);
        assert_eq!(s.at(80), 1.0);
        assert!((s.at(90) - 0.55).abs() < 1e-12, "{}", s.at(90));
        assert_eq!(s.at(100), 0.1);
        let sqrt = wsd(100, Cooldown::OneMinusSqrt);
        assert!((sqrt.at(90) - (0.1 + 0.9 * (1.0 - 0.5f64.sqrt()))).abs() < 1e-12);
        // Every step before a shorter run's cooldown has the rate of the longer run: a run of 1,000 steps
        // serves the run of 100 up to step 80.
        let long = wsd(1000, Cooldown::Linear);
        assert!((0..80).all(|t| long.at(t) == s.at(t)));
        // Cosine is the schedule it was.
        let cos = Schedule {
            kind: LrSchedule::Cosine,
            ..s
        };
        assert_eq!(cos.cooldown_start(), None);
        assert!((0..120).all(|t| cos.at(t) == lr_at(t, 1.0, 0.1, 10, Some(100))));
    }

    #[test]
    fn matches_candle_nn_adamw() -> Result<()> {
        let dev = Device::Cpu;
        let init = crate::model::init::seeded_randn(110, 0.0, 1.0, (4, 3), DType::F32, &dev)?;
        let ours = Var::from_tensor(&init)?;
        let theirs = Var::from_tensor(&init)?;
        let target = crate::model::init::seeded_randn(111, 0.0, 1.0, (4, 3), DType::F32, &dev)?;
        let mut vars = HashMap::new();
        vars.insert("blocks.0.w.weight".to_string(), ours.clone());
        let mut opt = AdamW::new(&vars, 0.1)?;
        let params = ParamsAdamW {
            lr: 0.01,
            beta1: BETA1,
            beta2: BETA2,
            eps: EPS,
            weight_decay: 0.1,
        };
        let mut reference = candle_nn::AdamW::new(vec![theirs.clone()], params)?;
        for _ in 0..5 {
            let g_ours = (ours.as_tensor() - &target)?.sqr()?.sum_all()?.backward()?;
            opt.update(&g_ours, 0.01)?;
            let loss = (theirs.as_tensor() - &target)?.sqr()?.sum_all()?;
            reference.backward_step(&loss)?;
        }
        let diff = (ours.as_tensor() - theirs.as_tensor())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "ours and candle-nn's AdamW differ by {diff}");
        assert_eq!(opt.step, 5);
        Ok(())
    }

    #[test]
    fn state_round_trips() -> Result<()> {
        let dev = Device::Cpu;
        let v = Var::zeros((2, 2), DType::F32, &dev)?;
        let mut vars = HashMap::new();
        vars.insert("a.weight".to_string(), v.clone());
        let mut opt = AdamW::new(&vars, 0.0)?;
        let g = (v.as_tensor() + 1.0)?.sum_all()?.backward()?;
        opt.update(&g, 0.1)?;
        let saved = opt.state_tensors();
        let mut fresh = AdamW::new(&vars, 0.0)?;
        fresh.load_state(&saved, opt.step)?;
        assert_eq!(fresh.step, 1);
        let a: Vec<f32> = fresh.state_tensors()["m.a.weight"]
            .flatten_all()?
            .to_vec1()?;
        let b: Vec<f32> = saved["m.a.weight"].flatten_all()?.to_vec1()?;
        assert_eq!(a, b);
        Ok(())
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        assert!((lr_at(0, 1.0, 0.1, 10, Some(100)) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 1.0, 0.1, 10, Some(100)) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 1.0, 0.1, 10, Some(100)) - 1.0).abs() < 1e-12);
        assert!((lr_at(55, 1.0, 0.1, 10, Some(100)) - 0.55).abs() < 1e-9);
        assert!((lr_at(100, 1.0, 0.1, 10, Some(100)) - 0.1).abs() < 1e-12);
        assert_eq!(lr_at(500, 1.0, 0.1, 10, None), 1.0);
    }

    #[test]
    fn no_decay_on_norms_and_embeddings() {
        assert!(decays("blocks.0.mlp.up.weight", 2));
        assert!(!decays("embed.weight", 2));
        assert!(!decays("blocks.0.norm1.weight", 1));
        assert!(!decays("blocks.0.mixer.ln.weight", 3));
        assert!(!decays("blocks.0.mixer.b0", 3));
    }
}
