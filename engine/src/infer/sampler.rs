//! Next-token sampling: greedy (temperature 0) or temperature + top-k + top-p (nucleus, Holtzman et al.
//! 2020) from a seeded ChaCha8 stream, so a seed reproduces a generation on every machine.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sampling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    /// 0 = greedy (argmax).
    pub temperature: f64,
    /// Keep the k most likely tokens (`None` or 0 = all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches p (`None` or ≥ 1 = all).
    pub top_p: Option<f64>,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

impl SamplerConfig {
    /// Reject settings that mean nothing, with a message naming the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            anyhow::bail!(
                "--temperature must be a number ≥ 0 (got {})",
                self.temperature
            );
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                anyhow::bail!("--top-p must be in (0, 1] (got {p})");
            }
        }
        Ok(())
    }
}

/// A sampler with its own random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: SamplerConfig,
    rng: ChaCha8Rng,
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    // The first of the largest; NaN never wins.
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in logits.iter().enumerate() {
        if !v.is_nan() && best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Self {
        Self {
            cfg,
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
        }
    }

    /// Start the random stream again from the seed.
    pub fn reset(&mut self) {
        self.rng = ChaCha8Rng::seed_from_u64(self.cfg.seed);
    }

    /// Pick the next token from the logits of the last position.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.temperature == 0.0 || logits.len() <= 1 {
            return argmax(logits);
        }
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)) as f64;
        if !max.is_finite() || logits.iter().any(|v| v.is_nan()) {
            // NaN or +inf logits have no softmax (all -inf: no information); `generate` refuses
            // non-finite logits, a direct caller gets argmax.
            return argmax(logits);
        }
        // Softmax of logits / T in f64, candidates sorted by probability (ties by id, for determinism).
        // Dividing (not multiplying by 1/T) keeps a tiny T finite: the top token gets exp(0) = 1.
        let t = self.cfg.temperature;
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, v)| (i as u32, ((*v as f64 - max) / t).exp()))
            .collect();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = self.cfg.top_k.filter(|k| *k > 0) {
            probs.truncate(k);
        }
        let total: f64 = probs.iter().map(|p| p.1).sum();
        if let Some(p) = self.cfg.top_p.filter(|p| *p < 1.0) {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, (_, q)) in probs.iter().enumerate() {
                cum += q / total;
                if cum >= p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().map(|p| p.1).sum();
        if !(total.is_finite() && total > 0.0) {
            return probs.first().map_or(0, |p| p.0);
        }
        let mut r = self.rng.gen::<f64>() * total;
        for (id, q) in &probs {
            if r < *q {
                return *id;
            }
            r -= q;
        }
        probs.last().map_or(0, |p| p.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(temperature: f64, top_k: Option<usize>, top_p: Option<f64>) -> SamplerConfig {
        SamplerConfig {
            temperature,
            top_k,
            top_p,
            seed: 42,
        }
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(cfg(0.0, None, None));
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 2.0]), 1);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let logits = [3.0f32, 2.9, 2.8, -5.0, -6.0];
        let mut k1 = Sampler::new(cfg(1.0, Some(1), None));
        let mut p_small = Sampler::new(cfg(1.0, None, Some(0.01)));
        let mut k2 = Sampler::new(cfg(5.0, Some(2), None));
        for _ in 0..200 {
            assert_eq!(k1.sample(&logits), 0);
            assert_eq!(p_small.sample(&logits), 0);
            assert!(k2.sample(&logits) <= 1);
        }
        // With a high temperature and no filter every token shows up.
        let mut all = Sampler::new(cfg(50.0, None, None));
        let mut seen = [false; 5];
        for _ in 0..2000 {
            seen[all.sample(&logits) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn same_seed_same_draws_and_reset_restarts() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.7).sin()).collect();
        let mut a = Sampler::new(cfg(1.0, Some(20), Some(0.9)));
        let mut b = Sampler::new(cfg(1.0, Some(20), Some(0.9)));
        let xs: Vec<u32> = (0..30).map(|_| a.sample(&logits)).collect();
        let ys: Vec<u32> = (0..30).map(|_| b.sample(&logits)).collect();
        assert_eq!(xs, ys);
        a.reset();
        assert_eq!((0..30).map(|_| a.sample(&logits)).collect::<Vec<_>>(), xs);
    }

    #[test]
    fn extreme_temperatures_and_logits_pick_the_top_token() {
        let logits = [0.5f32, 3.0, -2.0, 1.0];
        // 1/T would be infinite here, and ∞·0 a NaN that made the least likely token win.
        let mut tiny = Sampler::new(cfg(1e-320, None, None));
        let mut masked = Sampler::new(cfg(1.0, Some(10), None));
        for _ in 0..50 {
            assert_eq!(tiny.sample(&logits), 1);
            assert_eq!(
                masked.sample(&[f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY]),
                1
            );
        }
        assert_eq!(tiny.sample(&[0.0, f32::INFINITY, 1.0]), 1);
        // A NaN never wins, first place or not.
        assert_eq!(tiny.sample(&[f32::NAN, 1.0, 0.5]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0]), 1);
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(cfg(-1.0, None, None).validate().is_err());
        assert!(cfg(1.0, None, Some(0.0)).validate().is_err());
        assert!(cfg(1.0, None, Some(1.5)).validate().is_err());
        assert!(cfg(0.0, Some(3), Some(0.5)).validate().is_ok());
    }
}
