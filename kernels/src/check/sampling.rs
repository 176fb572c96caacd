//! The sampling check: the device's sampler against a plain f64 implementation of the same
//! algorithm on rows that exercise every step (temperature, top-k/p, penalties, adjustments,
//! bans, masks, forcing).

use super::{CheckReport, Lcg};
use crate::{sample, RowSampling};
use candle_core::{DType, Device, Result, Tensor};

/// `n` distinct random tokens below `vocab` with adjustments in [-3, 3], and `extra` (distinct
/// from them) with theirs.
fn random_adjust(rng: &mut Lcg, vocab: u32, n: usize, extra: &[(u32, f32)]) -> Vec<(u32, f32)> {
    let mut adjust = extra.to_vec();
    while adjust.len() < n + extra.len() {
        let t = (rng.next() % vocab as u64) as u32;
        if !adjust.iter().any(|a| a.0 == t) {
            adjust.push((t, rng.uniform() * 3.0));
        }
    }
    adjust
}

/// Sampling specs covering every step of the algorithm, one per row.
pub fn sampling_specs(vocab: u32) -> Vec<RowSampling> {
    let g = RowSampling::greedy();
    let mut rng = Lcg(4321);
    // Adjustments of a sampled row: random tokens, some of them also penalised (multiples of
    // 7) or banned (multiples of 11).
    let overlapping: Vec<(u32, f32)> = [7, 14, 77, 154, 22, 49]
        .into_iter()
        .filter(|&t| t < vocab)
        .map(|t| (t, rng.uniform() * 3.0))
        .collect();
    let mut sampled_adjust = random_adjust(&mut rng, vocab, 60, &overlapping);
    // One id listed twice (`sample` sums them).
    sampled_adjust.push((sampled_adjust[10].0, 0.75));
    // A greedy row's: large enough that an adjusted token is likely the arg max.
    let greedy_adjust = random_adjust(&mut rng, vocab, 200, &[]);
    let mut specs = vec![
        g.clone(),
        RowSampling {
            logprobs: 5,
            ..g.clone()
        },
        RowSampling {
            temperature: 1.0,
            ..g.clone()
        },
        RowSampling {
            temperature: 0.7,
            top_k: 40,
            ..g.clone()
        },
        RowSampling {
            temperature: 1.3,
            top_p: 0.9,
            ..g.clone()
        },
        RowSampling {
            temperature: 0.8,
            top_k: 100,
            top_p: 0.5,
            logprobs: 3,
            ..g.clone()
        },
        RowSampling {
            temperature: 1.0,
            repetition_penalty: 1.3,
            penalized: (0..vocab).step_by(7).collect(),
            banned: (0..vocab).step_by(11).collect(),
            adjust: sampled_adjust,
            ..g.clone()
        },
        RowSampling {
            banned: (0..vocab).collect(),
            ..g.clone()
        },
        // Constrained: every third token allowed, the mask one word short of the vocabulary.
        RowSampling {
            temperature: 0.9,
            allowed: Some(
                (0..(vocab as usize / 32).saturating_sub(1))
                    .map(|_| 0x4924_9249)
                    .collect(),
            ),
            ..g.clone()
        },
        RowSampling {
            allowed: Some(vec![0, 1 << 7]),
            logprobs: 2,
            ..g.clone()
        },
        // Greedy over adjusted logits (the chosen token's raw log-probability), with the
        // repetition penalty on some of the adjusted tokens.
        RowSampling {
            repetition_penalty: 1.2,
            penalized: greedy_adjust.iter().step_by(3).map(|a| a.0).collect(),
            adjust: greedy_adjust,
            logprobs: 4,
            ..g.clone()
        },
        // Teacher forcing: the token and its raw log-probability, whatever the rest says.
        RowSampling {
            force: Some(vocab / 3),
            temperature: 0.8,
            logprobs: 3,
            repetition_penalty: 1.5,
            penalized: vec![vocab / 3, 1],
            adjust: vec![(vocab / 3, -2.5), (2, 1.0)],
            banned: vec![vocab / 3],
            ..g
        },
    ];
    for (i, s) in specs.iter_mut().enumerate() {
        s.uniform = crate::sampling::uniform(1234, i as u64);
        // Most rows also report the chosen token's own log-probability.
        s.token_logprob = i % 4 != 0;
    }
    specs
}

/// A row in f64 (NaN as -inf, as the sampler reads it) and its log-sum-exp.
fn raw_row(row: &[f32]) -> (Vec<f64>, f64) {
    let raw: Vec<f64> = row
        .iter()
        .map(|&v| {
            if v.is_nan() {
                f64::NEG_INFINITY
            } else {
                v as f64
            }
        })
        .collect();
    let max = raw.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let log_sum = max + raw.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
    (raw, log_sum)
}

/// [`plain_sample_inner`] and the chosen token's log-probability in the raw distribution.
fn plain_sample_lp(row: &[f32], spec: &RowSampling) -> (u32, f64, Vec<(u32, f64)>, f64) {
    let (token, margin, top) = plain_sample_inner(row, spec);
    // A banned token is chosen only when every token is banned (or forced); it has no
    // probability then (unless forced: a forced token's is of the raw distribution).
    let lp = if spec.force.is_none() && spec.banned.contains(&token) {
        f64::NEG_INFINITY
    } else {
        let (raw, log_sum) = raw_row(row);
        raw[token as usize] - log_sum
    };
    (token, margin, top, lp)
}

/// The sampling steps of [`crate::sampling`] written again, plainly and in f64: the CPU's
/// `sample` *is* `sample_row`, so the check compares against this instead. Returns the token,
/// how close the draw came to a decision boundary (relative to the mass, infinite for the arg
/// max) and the top log-probabilities.
fn plain_sample_inner(row: &[f32], spec: &RowSampling) -> (u32, f64, Vec<(u32, f64)>) {
    let (raw, log_sum) = raw_row(row);
    let mut by_value: Vec<usize> = (0..raw.len()).collect();
    by_value.sort_by(|&a, &b| raw[b].total_cmp(&raw[a]).then(a.cmp(&b)));
    let top = by_value
        .iter()
        .take(spec.logprobs as usize)
        .map(|&i| (i as u32, raw[i] - log_sum))
        .collect();
    if let Some(t) = spec.force {
        return (t, f64::INFINITY, top);
    }
    // The penalty is defined on f32 values (transformers' rule), and so are the additive
    // adjustments after it (repeated ids summed first); bans remove tokens.
    let mut xf: Vec<f32> = raw.iter().map(|&v| v as f32).collect();
    for &t in &spec.penalized {
        let v = row[t as usize];
        let p = spec.repetition_penalty;
        xf[t as usize] = if v > 0.0 { v / p } else { v * p };
    }
    let mut adjust: Vec<(u32, f32)> = Vec::new();
    for &(t, a) in &spec.adjust {
        match adjust.iter_mut().find(|b| b.0 == t) {
            Some(b) => b.1 += a,
            None => adjust.push((t, a)),
        }
    }
    for (t, a) in adjust {
        xf[t as usize] += a;
    }
    let mut x: Vec<f64> = xf.iter().map(|&v| v as f64).collect();
    for &t in &spec.banned {
        x[t as usize] = f64::NEG_INFINITY;
    }
    if let Some(words) = &spec.allowed {
        for (t, v) in x.iter_mut().enumerate() {
            if (words.get(t / 32).copied().unwrap_or(0) >> (t % 32)) & 1 == 0 {
                *v = f64::NEG_INFINITY;
            }
        }
    }
    // The first (lowest id) of the largest values.
    let arg = (0..x.len()).fold(0, |a, i| if x[i] > x[a] { i } else { a });
    let best = x[arg];
    if spec.temperature <= 0.0 || best == f64::NEG_INFINITY {
        return (arg as u32, f64::INFINITY, top);
    }
    let mut desc: Vec<f64> = x.iter().cloned().filter(|v| v.is_finite()).collect();
    desc.sort_by(|a, b| b.total_cmp(a));
    let mut floor = f64::NEG_INFINITY;
    if spec.top_k > 0 && (spec.top_k as usize) < desc.len() {
        floor = desc[spec.top_k as usize - 1];
    }
    let weight = |v: f64| ((v - best) / spec.temperature as f64).exp();
    let mut margin = f64::INFINITY;
    if spec.top_p < 1.0 {
        let kept: Vec<f64> = desc.iter().cloned().filter(|&v| v >= floor).collect();
        let total: f64 = kept.iter().map(|&v| weight(v)).sum();
        let need = spec.top_p as f64 * total;
        let mut acc = 0.0;
        for &v in &kept {
            let before = acc;
            acc += weight(v);
            if acc >= need {
                margin = ((need - before).abs().min(acc - need)) / total;
                floor = floor.max(v);
                break;
            }
        }
    }
    let kept = |v: f64| v.is_finite() && v >= floor;
    let total: f64 = x.iter().filter(|&&v| kept(v)).map(|&v| weight(v)).sum();
    let target = spec.uniform as f64 * total;
    let mut acc = 0.0;
    for (i, &v) in x.iter().enumerate() {
        if !kept(v) {
            continue;
        }
        let before = acc;
        acc += weight(v);
        if acc >= target {
            let m = (target - before).abs().min(acc - target) / total;
            return (i as u32, margin.min(m), top);
        }
    }
    (arg as u32, 0.0, top)
}

/// The vocabulary of the sampling check.
const SAMPLING_VOCAB: usize = 5000;

/// The sampling check's logits: `rows` rows of `vocab` values in [-6, 6].
fn sampling_logits(rows: usize, vocab: usize) -> Vec<f32> {
    let mut rng = Lcg(77);
    (0..rows * vocab).map(|_| rng.uniform() * 6.0).collect()
}

/// The device's tokens must equal [`plain_sample`]'s except where the draw fell within 1e-3 of
/// a boundary (sums in another order may land on either side); log-probabilities (the top ones
/// and the chosen token's) within 1e-3.
pub(super) fn check_sampling(device: &Device) -> Result<CheckReport> {
    let vocab = SAMPLING_VOCAB;
    let specs = sampling_specs(vocab as u32);
    let rows = specs.len();
    let host = sampling_logits(rows, vocab);
    let logits = Tensor::from_slice(&host, (rows, vocab), device)?;
    let got = sample(logits, &specs)?;
    let mut err = 0f32;
    for (r, spec) in specs.iter().enumerate() {
        let (token, margin, top, lp) = plain_sample_lp(&host[r * vocab..(r + 1) * vocab], spec);
        if got[r].token != token && margin >= 1e-3 {
            err = f32::INFINITY;
        }
        match (spec.token_logprob, got[r].logprob) {
            (false, None) => {}
            // Where the token is the same, its log-probability must be too.
            (true, Some(g)) if got[r].token == token => {
                let d = if g == f32::NEG_INFINITY && lp == f64::NEG_INFINITY {
                    0.0
                } else {
                    (g as f64 - lp).abs() as f32
                };
                err = if d.is_finite() {
                    err.max(d)
                } else {
                    f32::INFINITY
                };
            }
            (true, Some(g)) if g.is_finite() || g == f32::NEG_INFINITY => {}
            _ => err = f32::INFINITY,
        }
        if got[r].top_logprobs.len() != top.len() {
            err = f32::INFINITY;
        }
        for (a, b) in got[r].top_logprobs.iter().zip(&top) {
            let d = (a.1 as f64 - b.1).abs() as f32;
            err = if a.0 != b.0 || !d.is_finite() {
                f32::INFINITY
            } else {
                err.max(d)
            };
        }
    }
    Ok(CheckReport {
        op: "sample",
        case: format!(
            "{rows} rows x {vocab}: greedy, logprobs, temperature, top-k, top-p, penalties, \
             adjustments, bans, masks, forcing"
        ),
        dtype: DType::F32,
        max_abs_err: err,
        tolerance: 1e-3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check's rows reach what they are there for: the greedy adjusted row chooses an
    /// adjusted token whose raw log-probability differs from its adjusted one, and the forced
    /// row's token is not its arg max.
    #[test]
    fn the_sampling_check_exercises_adjustments_and_forcing() {
        let vocab = SAMPLING_VOCAB;
        let specs = sampling_specs(vocab as u32);
        let host = sampling_logits(specs.len(), vocab);
        let row = |r: usize| &host[r * vocab..(r + 1) * vocab];
        let (r, spec) = specs
            .iter()
            .enumerate()
            .find(|(_, s)| s.temperature == 0.0 && !s.adjust.is_empty() && s.force.is_none())
            .expect("a greedy adjusted row");
        let (token, _, _, lp) = plain_sample_lp(row(r), spec);
        let adj = spec.adjust.iter().find(|a| a.0 == token);
        assert!(
            adj.is_some_and(|a| a.1 != 0.0),
            "token {token} not adjusted"
        );
        let (raw, log_sum) = raw_row(row(r));
        assert!((lp - (raw[token as usize] - log_sum)).abs() < 1e-9 && lp.is_finite());
        let (r, spec) = specs
            .iter()
            .enumerate()
            .find(|(_, s)| s.force.is_some())
            .expect("a forced row");
        let (token, _, top, lp) = plain_sample_lp(row(r), spec);
        assert_eq!(Some(token), spec.force);
        assert!(top[0].0 != token && lp.is_finite() && spec.token_logprob);
        assert!(specs.iter().any(|s| s.temperature > 0.0
            && s.adjust.iter().any(|a| s.penalized.contains(&a.0))
            && s.adjust.iter().any(|a| s.banned.contains(&a.0))));
    }
}
