//! Picks the next token from processed logits: greedy, or temperature + top-k + top-p with a
//! seeded RNG so that a given seed reproduces the same tokens.

use super::SamplingParams;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Candidates examined before falling back to a full sort for top-p.
const TOP_P_FAST_CANDIDATES: usize = 256;

/// A per-request sampler.
#[derive(Debug, Clone)]
pub struct Sampler {
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from `seed`, or from the OS when `None`.
    pub fn new(seed: Option<u64>) -> Self {
        let seed = seed.unwrap_or_else(rand::random);
        Self {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Samples from processed logits (`temperature == 0` takes the argmax).
    pub fn sample(&mut self, logits: &[f32], params: &SamplingParams) -> u32 {
        if params.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / params.temperature;
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(logits);
        }
        // Candidates (id, unnormalised probability), most likely first.
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, ((l - max) * inv_t).exp()))
            .collect();
        let by_prob = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let total: f32 = cand.iter().map(|c| c.1).sum();
        let mut keep = if params.top_k > 0 {
            params.top_k.min(cand.len())
        } else {
            cand.len()
        };
        if keep < cand.len() || params.top_p < 1.0 {
            let head = keep.clamp(1, TOP_P_FAST_CANDIDATES);
            if head < cand.len() {
                cand.select_nth_unstable_by(head - 1, by_prob);
            }
            cand[..head].sort_by(by_prob);
            let head_mass: f32 = cand[..head].iter().map(|c| c.1).sum();
            let need = params.top_p * total;
            if head_mass < need && keep > head {
                // Rare: the nucleus is wider than the fast window.
                cand.sort_by(by_prob);
            }
            keep = keep.min(cand.len());
            if params.top_p < 1.0 {
                let mut acc = 0.0;
                for (i, c) in cand[..keep].iter().enumerate() {
                    acc += c.1;
                    if acc >= need {
                        keep = i + 1;
                        break;
                    }
                }
            }
            cand.truncate(keep.max(1));
        }
        let mass: f32 = cand.iter().map(|c| c.1).sum();
        let mut r = self.rng.random::<f32>() * mass;
        for &(id, p) in &cand {
            r -= p;
            if r <= 0.0 {
                return id;
            }
        }
        cand.last().map_or(0, |c| c.0)
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The `k` most likely tokens with their log-probabilities (log-softmax of `logits`).
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    let mut idx: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l - lse))
        .collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    let cmp = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    idx.select_nth_unstable_by(k - 1, cmp);
    idx.truncate(k);
    idx.sort_by(cmp);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_argmax() {
        let mut s = Sampler::new(Some(0));
        assert_eq!(s.sample(&[0.1, 3.0, 2.9], &SamplingParams::greedy(1)), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.13).sin()).collect();
        let p = SamplingParams {
            temperature: 1.0,
            ..Default::default()
        };
        let draw = |seed| {
            let mut s = Sampler::new(Some(seed));
            (0..20).map(|_| s.sample(&logits, &p)).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_restricts() {
        let logits = vec![1.0, 5.0, 4.9, -3.0];
        let mut s = Sampler::new(Some(1));
        let p = SamplingParams {
            temperature: 5.0,
            top_k: 1,
            ..Default::default()
        };
        assert!((0..50).all(|_| s.sample(&logits, &p) == 1));
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.6,
            ..Default::default()
        };
        let drawn: std::collections::HashSet<u32> =
            (0..200).map(|_| s.sample(&logits, &p)).collect();
        assert!(drawn.is_subset(&[1, 2].into_iter().collect()), "{drawn:?}");
        assert_eq!(drawn.len(), 2);
    }

    #[test]
    fn logprobs_are_log_softmax() {
        let lp = top_logprobs(&[0.0, 0.0], 2);
        assert!((lp[0].1 - 0.5f32.ln()).abs() < 1e-6);
        assert_eq!(lp[0].0, 0);
    }
}
