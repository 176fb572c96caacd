//! Sampling where the logits are: each row of `[rows, vocab]` logits becomes one token id (and
//! its requested log-probabilities), so a GPU sends back a few bytes per row instead of the
//! vocabulary. The CUDA kernel (`cuda/sample.cu`) and [`sample_row`] implement the same steps:
//!
//! 1. top-n log-probabilities of the raw logits, ordered by (value desc, id asc); a forced row
//!    (teacher forcing, [`RowSampling::force`]) stops here: its token is the forced one, with
//!    that token's log-probability in the raw distribution;
//! 2. repetition penalty on the listed tokens (transformers' rule), then the additive
//!    adjustments (OpenAI's frequency and presence penalties and `logit_bias`), then bans to
//!    `-inf`, and every token outside a constrained row's allowed set (a bitmask) to `-inf`;
//! 3. temperature 0 (or nothing left): the arg max, lowest id on ties;
//! 4. `p_i = exp((x_i - max) / T)` restricted to the top-k tokens (the k-th largest value, ties
//!    kept) and then the top-p nucleus of those (the largest value whose tail holds `top_p` of
//!    their mass), as transformers' warpers do in that order;
//! 5. the token whose interval of the running sum over ids in increasing order holds
//!    `u * sum(p)`, for the row's uniform draw `u` ([`uniform`] of the request's seed and step).
//!
//! The chosen token's log-probability (when asked for) is always of the raw distribution:
//! a token the penalty or an adjustment changed reports its logit from before step 2.

use crate::storage::cpu_f32_mut;
use candle_core::{bail, CpuStorage, DType, InplaceOp1, Layout, Result, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

/// Candidates the CPU sorts first when looking for the top-p nucleus.
const TOP_P_WINDOW: usize = 256;

/// Most log-probabilities a row may ask for (OpenAI's limit).
pub const MAX_LOGPROBS: usize = 20;

/// How one row is sampled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowSampling {
    /// 0 takes the arg max.
    pub temperature: f32,
    /// 0 keeps every token.
    pub top_k: u32,
    /// 1 keeps every token.
    pub top_p: f32,
    /// 1 is none.
    pub repetition_penalty: f32,
    /// Tokens the penalty applies to (the sequence's history).
    pub penalized: Vec<u32>,
    /// Tokens that may not be chosen.
    pub banned: Vec<u32>,
    /// The draw in `[0, 1)`.
    pub uniform: f32,
    /// Log-probabilities of the raw distribution to return (at most [`MAX_LOGPROBS`]).
    pub logprobs: u32,
    /// Also return the chosen token's log-probability in the raw distribution.
    pub token_logprob: bool,
    /// Constrained decoding: the tokens that may be chosen, as a bitmask (bit `t % 32` of word
    /// `t / 32`); tokens past its end may not. `None`: every token.
    #[serde(default)]
    pub allowed: Option<Vec<u32>>,
    /// Additive logit adjustments `(token, value)`, applied after the repetition penalty and
    /// before the bans and the allowed mask (OpenAI's `frequency_penalty`, `presence_penalty`
    /// and `logit_bias`). [`sample`] merges repeated ids by summing their values.
    #[serde(default)]
    pub adjust: Vec<(u32, f32)>,
    /// Teacher forcing (a prompt row): nothing is sampled, the row's token is this one, its
    /// `logprob` (when asked for) that of the raw distribution, and the top log-probabilities
    /// as usual. Penalties, adjustments, bans and the mask are ignored.
    #[serde(default)]
    pub force: Option<u32>,
}

/// Whether bitmask `words` allows token `t`.
pub fn mask_allows(words: &[u32], t: usize) -> bool {
    words.get(t / 32).is_some_and(|w| (w >> (t % 32)) & 1 == 1)
}

impl RowSampling {
    /// Whether the parameters are in range (the token lists are checked against a vocabulary
    /// by [`sample`]).
    pub fn is_valid(&self) -> bool {
        let temperature = self.temperature >= 0.0 && self.temperature.is_finite();
        let top_p = self.top_p > 0.0 && self.top_p <= 1.0;
        let penalty = self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite();
        temperature
            && top_p
            && penalty
            && (0.0..1.0).contains(&self.uniform)
            && self.logprobs as usize <= MAX_LOGPROBS
    }

    /// The arg max, nothing else.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            penalized: Vec::new(),
            banned: Vec::new(),
            uniform: 0.0,
            logprobs: 0,
            token_logprob: false,
            allowed: None,
            adjust: Vec::new(),
            force: None,
        }
    }
}

/// What a row sampled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampledToken {
    pub token: u32,
    /// `(token, log-probability)` of the raw distribution, most likely first.
    pub top_logprobs: Vec<(u32, f32)>,
    /// The chosen token's log-probability in the raw distribution, when asked for.
    #[serde(default)]
    pub logprob: Option<f32>,
}

/// A uniform draw in `[0, 1)` from `(seed, step)` (splitmix64; 24 random bits).
pub fn uniform(seed: u64, step: u64) -> f32 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

/// Samples every row of `logits` (`[rows, vocab]`, on the CPU or a GPU), one spec per row. The
/// logits are overwritten (penalties are applied in place).
pub fn sample(logits: Tensor, specs: &[RowSampling]) -> Result<Vec<SampledToken>> {
    let (rows, vocab) = logits.dims2()?;
    if rows != specs.len() {
        bail!("sample: {rows} logits rows for {} specs", specs.len());
    }
    let mut clean = Vec::with_capacity(rows);
    for (r, s) in specs.iter().enumerate() {
        if !s.is_valid() {
            bail!("sample: row {r} has invalid parameters {s:?}");
        }
        if let Some(&t) = s
            .penalized
            .iter()
            .chain(&s.banned)
            .chain(s.adjust.iter().map(|a| &a.0))
            .chain(&s.force)
            .find(|&&t| t as usize >= vocab)
        {
            bail!("sample: row {r} names token {t}, outside the vocabulary of {vocab}");
        }
        let mut s = s.clone();
        for list in [&mut s.penalized, &mut s.banned] {
            list.sort_unstable();
            list.dedup();
        }
        if s.repetition_penalty == 1.0 {
            s.penalized.clear();
        }
        // A non-finite value stays non-finite in its token's sum (never 0, so never dropped).
        s.adjust = merge_adjustments(&s.adjust);
        if let Some(&(t, v)) = s.adjust.iter().find(|a| !a.1.is_finite()) {
            bail!("sample: row {r} adjusts token {t} by {v} in all, not a finite number");
        }
        clean.push(s);
    }
    if rows == 0 {
        return Ok(Vec::new());
    }
    let logits = logits.to_dtype(DType::F32)?.contiguous()?;
    let op = SampleRows {
        specs: &clean,
        result: Mutex::new(None),
    };
    logits.inplace_op1(&op)?;
    let result = op.result.into_inner().ok().flatten();
    match result {
        Some(r) => Ok(r),
        None => bail!("sample: the op returned nothing"),
    }
}

/// `adjust` with one entry per token (repeated ids' values summed, in list order), ordered
/// by id, without the entries that sum to 0.
fn merge_adjustments(adjust: &[(u32, f32)]) -> Vec<(u32, f32)> {
    let mut sorted = adjust.to_vec();
    // Stable: repeated ids keep their list order, so their sum is the same on every device.
    sorted.sort_by_key(|a| a.0);
    let mut merged: Vec<(u32, f32)> = Vec::with_capacity(sorted.len());
    for (t, v) in sorted {
        match merged.last_mut() {
            Some(last) if last.0 == t => last.1 += v,
            _ => merged.push((t, v)),
        }
    }
    merged.retain(|a| a.1 != 0.0);
    merged
}

struct SampleRows<'a> {
    specs: &'a [RowSampling],
    result: Mutex<Option<Vec<SampledToken>>>,
}

impl SampleRows<'_> {
    fn set(&self, tokens: Vec<SampledToken>) {
        if let Ok(mut r) = self.result.lock() {
            *r = Some(tokens);
        }
    }
}

impl InplaceOp1 for SampleRows<'_> {
    fn name(&self) -> &'static str {
        "sample-rows"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let vocab = layout.dims()[1];
        let x = cpu_f32_mut(storage, layout, "logits")?;
        let out = x
            .par_chunks_mut(vocab)
            .zip(self.specs)
            .map(|(row, spec)| sample_row(row, spec).0)
            .collect();
        self.set(out);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &mut candle_core::CudaStorage, layout: &Layout) -> Result<()> {
        self.set(crate::cuda::sample(storage, layout, self.specs)?);
        Ok(())
    }
}

/// Order-preserving key of a float (larger float, larger key).
fn key_of(f: f32) -> u32 {
    let u = f.to_bits();
    if u & 0x8000_0000 != 0 {
        !u
    } else {
        u | 0x8000_0000
    }
}

/// The `n` most likely tokens by (value desc, id asc) with their log-softmax values.
pub fn top_logprobs(x: &[f32], n: usize) -> Vec<(u32, f32)> {
    top_logprobs_with(x, n, log_sum_exp(x))
}

/// `log(sum(exp(x)))` of a row.
fn log_sum_exp(x: &[f32]) -> f32 {
    let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    max + x.iter().map(|l| (l - max).exp()).sum::<f32>().ln()
}

fn top_logprobs_with(x: &[f32], n: usize, lse: f32) -> Vec<(u32, f32)> {
    if n == 0 || x.is_empty() {
        return Vec::new();
    }
    let mut idx: Vec<(u32, f32)> = x.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
    let n = n.min(idx.len());
    let cmp = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    idx.select_nth_unstable_by(n - 1, cmp);
    idx.truncate(n);
    idx.sort_by(cmp);
    idx.into_iter().map(|(i, l)| (i, l - lse)).collect()
}

/// Samples one row (modified in place). Also returns how close the draw came to a decision
/// boundary, relative to the mass it was taken over (`f32::INFINITY` for the arg max): a device
/// that sums in another order may decide differently only when this is tiny.
pub fn sample_row(x: &mut [f32], spec: &RowSampling) -> (SampledToken, f32) {
    for v in x.iter_mut() {
        if v.is_nan() {
            *v = f32::NEG_INFINITY;
        }
    }
    let lse = (spec.logprobs > 0 || spec.token_logprob).then(|| log_sum_exp(x));
    let top_logprobs = lse.map_or_else(Vec::new, |lse| {
        top_logprobs_with(x, spec.logprobs as usize, lse)
    });
    if let Some(token) = spec.force {
        // Teacher forcing: nothing modified, nothing drawn.
        let logprob = lse
            .filter(|_| spec.token_logprob)
            .map(|lse| x[token as usize] - lse);
        let forced = SampledToken {
            token,
            top_logprobs,
            logprob,
        };
        return (forced, f32::INFINITY);
    }
    // The raw logits of the tokens the penalty and the adjustments change (the chosen token's
    // log-probability is of the raw distribution; bans only remove tokens that are then not
    // chosen).
    let raw: Vec<(u32, f32)> = if spec.token_logprob {
        spec.penalized
            .iter()
            .chain(spec.adjust.iter().map(|a| &a.0))
            .map(|&t| (t, x[t as usize]))
            .collect()
    } else {
        Vec::new()
    };
    for &t in &spec.penalized {
        let v = &mut x[t as usize];
        *v = if *v > 0.0 {
            *v / spec.repetition_penalty
        } else {
            *v * spec.repetition_penalty
        };
    }
    for &(t, a) in &spec.adjust {
        x[t as usize] += a;
    }
    for &t in &spec.banned {
        x[t as usize] = f32::NEG_INFINITY;
    }
    if let Some(words) = &spec.allowed {
        for (t, v) in x.iter_mut().enumerate() {
            if !mask_allows(words, t) {
                *v = f32::NEG_INFINITY;
            }
        }
    }
    let mut arg = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[arg] {
            arg = i;
        }
    }
    let best = x[arg];
    let done = |token: usize, margin: f32| {
        let logprob = lse.filter(|_| spec.token_logprob).map(|lse| {
            let v = raw
                .iter()
                .find(|r| r.0 as usize == token)
                .map_or(x[token], |r| r.1);
            v - lse
        });
        (
            SampledToken {
                token: token as u32,
                top_logprobs: top_logprobs.clone(),
                logprob,
            },
            margin,
        )
    };
    if spec.temperature <= 0.0 || best == f32::NEG_INFINITY {
        return done(arg, f32::INFINITY);
    }
    let inv_t = 1.0 / spec.temperature;
    let weight = |v: f32| ((v - best) * inv_t).exp();
    let keys: Vec<u32> = x.iter().map(|&v| key_of(v)).collect();
    let mut thresh = 0u32;
    let vocab = x.len();
    if spec.top_k > 0 && (spec.top_k as usize) < vocab {
        let k = spec.top_k as usize - 1;
        let mut sorted = keys.clone();
        sorted.select_nth_unstable_by(k, |a, b| b.cmp(a));
        thresh = sorted[k];
    }
    // Weights of the top-k survivors (0 elsewhere), each exp computed once.
    let ninf = key_of(f32::NEG_INFINITY);
    let w: Vec<f32> = keys
        .iter()
        .zip(x.iter())
        .map(|(&k, &v)| {
            if k != ninf && k >= thresh {
                weight(v)
            } else {
                0.0
            }
        })
        .collect();
    let mut margin = f32::INFINITY;
    if spec.top_p < 1.0 {
        let mut cand: Vec<(u32, f32)> = keys
            .iter()
            .zip(&w)
            .filter(|(&k, _)| k >= thresh)
            .map(|(&k, &p)| (k, p))
            .collect();
        let total: f32 = cand.iter().map(|c| c.1).sum();
        let need = spec.top_p * total;
        // Most nuclei are narrow: sort a window of the largest first, everything if needed.
        let by_key = |c: &(u32, f32)| std::cmp::Reverse(c.0);
        let head = TOP_P_WINDOW.min(cand.len());
        if head < cand.len() {
            cand.select_nth_unstable_by_key(head - 1, by_key);
        }
        cand[..head].sort_unstable_by_key(by_key);
        if cand[..head].iter().map(|c| c.1).sum::<f32>() < need {
            cand.sort_unstable_by_key(by_key);
        }
        let mut acc = 0f32;
        for &(key, p) in &cand {
            let before = acc;
            acc += p;
            if acc >= need {
                margin = margin.min((need - before).abs().min(acc - need) / total);
                thresh = thresh.max(key);
                break;
            }
        }
    }
    let kept = |k: u32| k != ninf && k >= thresh;
    let total: f32 = keys
        .iter()
        .zip(&w)
        .filter(|(&k, _)| kept(k))
        .map(|(_, &p)| p)
        .sum();
    let target = spec.uniform * total;
    let mut acc = 0f32;
    for (i, (&k, &p)) in keys.iter().zip(&w).enumerate() {
        if !kept(k) {
            continue;
        }
        let before = acc;
        acc += p;
        if acc >= target {
            let m = (target - before).abs().min(acc - target) / total;
            return done(i, margin.min(m));
        }
    }
    // Rounding left the target a hair above the total: the arg max (always kept).
    done(arg, 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn spec(temperature: f32, top_k: u32, top_p: f32) -> RowSampling {
        RowSampling {
            temperature,
            top_k,
            top_p,
            ..RowSampling::greedy()
        }
    }

    fn draw(logits: &[f32], s: &RowSampling, seed: u64, n: u64) -> Vec<u32> {
        (0..n)
            .map(|step| {
                let mut s = s.clone();
                s.uniform = uniform(seed, step);
                sample_row(&mut logits.to_vec(), &s).0.token
            })
            .collect()
    }

    #[test]
    fn greedy_takes_the_first_arg_max() {
        assert_eq!(
            sample_row(&mut [0.1, 3.0, 3.0, 2.9], &RowSampling::greedy())
                .0
                .token,
            1
        );
    }

    #[test]
    fn same_seed_same_tokens_and_frequencies_follow_the_softmax() {
        let logits = [0.0f32, 1.0, 2.0];
        let s = spec(1.0, 0, 1.0);
        assert_eq!(draw(&logits, &s, 42, 50), draw(&logits, &s, 42, 50));
        assert_ne!(draw(&logits, &s, 42, 50), draw(&logits, &s, 43, 50));
        let n = 20_000;
        let tokens = draw(&logits, &s, 7, n);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        for t in 0..3 {
            let freq = tokens.iter().filter(|&&x| x == t).count() as f32 / n as f32;
            let p = logits[t as usize].exp() / z;
            // Binomial standard deviation at n = 20000 is at most 0.0035; 4 sigma.
            assert!((freq - p).abs() < 0.014, "token {t}: {freq} vs {p}");
        }
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let logits = [1.0f32, 5.0, 4.9, -3.0, 4.9];
        // top_k = 1 is greedy at any temperature.
        assert!(draw(&logits, &spec(5.0, 1, 1.0), 1, 50)
            .iter()
            .all(|&t| t == 1));
        // top_k = 2 keeps the tie at the threshold (ids 2 and 4 both hold 4.9).
        let drawn: std::collections::HashSet<u32> = draw(&logits, &spec(1.0, 2, 1.0), 2, 300)
            .into_iter()
            .collect();
        assert_eq!(drawn, [1, 2, 4].into_iter().collect());
        // top_p = 0.3: the top token alone holds more than 30 % of the mass.
        assert!(draw(&logits, &spec(1.0, 0, 0.3), 3, 50)
            .iter()
            .all(|&t| t == 1));
        // top_k then top_p renormalised over the top-k set (transformers' order).
        let logits = [3.0f32, 3.0, 0.0, 0.0, 0.0, 0.0];
        let drawn: std::collections::HashSet<u32> = draw(&logits, &spec(1.0, 2, 0.6), 4, 300)
            .into_iter()
            .collect();
        assert_eq!(drawn, [0, 1].into_iter().collect());
    }

    #[test]
    fn penalties_bans_and_logprobs() {
        // History token 1 is divided by 4 (5 -> 1.25), token 0 banned: token 2 wins.
        let s = RowSampling {
            repetition_penalty: 4.0,
            penalized: vec![1],
            banned: vec![0],
            logprobs: 2,
            ..RowSampling::greedy()
        };
        let (out, _) = sample_row(&mut [9.0, 5.0, 2.0, -1.0], &s);
        assert_eq!(out.token, 2);
        // Log-probabilities are of the raw logits, before penalties.
        assert_eq!(
            out.top_logprobs.iter().map(|p| p.0).collect::<Vec<_>>(),
            vec![0, 1]
        );
        let lse = [9.0f32, 5.0, 2.0, -1.0]
            .iter()
            .map(|x| x.exp())
            .sum::<f32>()
            .ln();
        assert!((out.top_logprobs[0].1 - (9.0 - lse)).abs() < 1e-5);
        // A negative logit is multiplied.
        let s = RowSampling {
            repetition_penalty: 2.0,
            penalized: vec![0, 1],
            ..RowSampling::greedy()
        };
        assert_eq!(sample_row(&mut [-1.0, -1.5, -1.8], &s).0.token, 2);
    }

    #[test]
    fn sample_checks_its_input_and_samples_rows() {
        let logits = Tensor::new(&[[0f32, 1., 2.], [5., 1., 0.]], &Device::Cpu).unwrap();
        let out = sample(
            logits.clone(),
            &[RowSampling::greedy(), RowSampling::greedy()],
        )
        .unwrap();
        assert_eq!(out.iter().map(|t| t.token).collect::<Vec<_>>(), vec![2, 0]);
        let bad = RowSampling {
            banned: vec![3],
            ..RowSampling::greedy()
        };
        let err = sample(logits.clone(), &[bad, RowSampling::greedy()]).unwrap_err();
        assert!(err.to_string().contains("token 3"), "{err}");
        assert!(sample(logits, &[RowSampling::greedy()]).is_err());
    }

    /// `log_softmax(row)[t]`, in f64.
    fn raw_logprob(row: &[f32], t: usize) -> f32 {
        let z: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
        (row[t] as f64 - z.ln()) as f32
    }

    fn close(a: Option<f32>, b: f32) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-5)
    }

    #[test]
    fn adjustments_move_the_arg_max() {
        let logits = [1.0f32, 2.0, 3.0, 0.5];
        let with = |adjust: Vec<(u32, f32)>, temperature: f32| RowSampling {
            adjust,
            temperature,
            ..RowSampling::greedy()
        };
        assert_eq!(
            sample_row(&mut logits.to_vec(), &with(vec![], 0.0)).0.token,
            2
        );
        // +100 forces a token, -100 removes one, at any temperature.
        assert_eq!(
            sample_row(&mut logits.to_vec(), &with(vec![(3, 100.0)], 0.0))
                .0
                .token,
            3
        );
        assert!(draw(&logits, &with(vec![(0, 100.0)], 1.0), 5, 200)
            .iter()
            .all(|&t| t == 0));
        assert_eq!(
            sample_row(&mut logits.to_vec(), &with(vec![(2, -100.0)], 0.0))
                .0
                .token,
            1
        );
        let drawn: std::collections::HashSet<u32> =
            draw(&logits, &with(vec![(2, -100.0), (1, -100.0)], 1.0), 6, 500)
                .into_iter()
                .collect();
        assert_eq!(drawn, [0, 3].into_iter().collect());
        // A ban still wins over a bias (bans come after the adjustments).
        let s = RowSampling {
            banned: vec![3],
            ..with(vec![(3, 100.0)], 0.0)
        };
        assert_eq!(sample_row(&mut logits.to_vec(), &s).0.token, 2);
    }

    /// OpenAI's frequency and presence penalties over a history, as adjustments after the
    /// repetition penalty: the row afterwards holds exactly the directly computed logits.
    #[test]
    fn frequency_like_adjustments_equal_a_direct_computation() {
        let logits = [1.5f32, -0.5, 2.0, 3.5, 0.3, -1.0, 0.9, 1.1];
        let history = [3u32, 3, 5, 1, 3, 6];
        let (freq, pres, rep) = (0.7f32, 0.4f32, 1.5f32);
        let mut adjust = Vec::new();
        for t in 0..logits.len() as u32 {
            let count = history.iter().filter(|&&h| h == t).count() as f32;
            if count > 0.0 {
                adjust.push((t, -(count * freq) - pres));
            }
        }
        let s = RowSampling {
            repetition_penalty: rep,
            penalized: vec![1, 3, 5, 6],
            adjust,
            token_logprob: true,
            ..RowSampling::greedy()
        };
        let mut row = logits.to_vec();
        let (out, _) = sample_row(&mut row, &s);
        let direct: Vec<f32> = logits
            .iter()
            .enumerate()
            .map(|(t, &v)| {
                let count = history.iter().filter(|&&h| h as usize == t).count() as f32;
                let v = if count > 0.0 {
                    if v > 0.0 {
                        v / rep
                    } else {
                        v * rep
                    }
                } else {
                    v
                };
                v - count * freq - if count > 0.0 { pres } else { 0.0 }
            })
            .collect();
        for (t, (a, b)) in row.iter().zip(&direct).enumerate() {
            assert!((a - b).abs() < 1e-6, "token {t}: {a} vs {b}");
        }
        // Token 3 (3.5) is still the best after the repetition penalty (3.5 / 1.5), not after
        // the adjustments (-3 * 0.7 - 0.4): token 2 (2.0) is.
        assert_eq!(out.token, 2);
        assert!(close(out.logprob, raw_logprob(&logits, 2)), "{out:?}");
    }

    /// The chosen token's log-probability is of the raw distribution even when the penalty
    /// and an adjustment (or only an adjustment) changed it, greedy or sampled.
    #[test]
    fn an_adjusted_chosen_token_reports_its_raw_logprob() {
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        for (penalized, temperature) in [(vec![3], 0.0), (vec![], 0.0), (vec![3, 0], 1.0)] {
            let s = RowSampling {
                repetition_penalty: 2.0,
                penalized,
                adjust: vec![(3, 50.0), (1, 0.5)],
                temperature,
                uniform: 0.5,
                token_logprob: true,
                ..RowSampling::greedy()
            };
            let (out, _) = sample_row(&mut logits.to_vec(), &s);
            assert_eq!(out.token, 3);
            assert!(
                close(out.logprob, raw_logprob(&logits, 3)),
                "{out:?} vs {}",
                raw_logprob(&logits, 3)
            );
        }
    }

    #[test]
    fn a_forced_row_returns_its_token_and_raw_logprob() {
        let logits = [5.0f32, 1.0, 0.0, 2.0];
        for temperature in [0.0, 1.0] {
            let s = RowSampling {
                force: Some(2),
                temperature,
                uniform: 0.3,
                logprobs: 2,
                token_logprob: true,
                // None of these apply to a forced row.
                repetition_penalty: 3.0,
                penalized: vec![2, 0],
                adjust: vec![(2, -40.0)],
                banned: vec![2],
                allowed: Some(vec![1]),
                ..RowSampling::greedy()
            };
            let (out, _) = sample_row(&mut logits.to_vec(), &s);
            assert_eq!(out.token, 2);
            assert!(close(out.logprob, raw_logprob(&logits, 2)), "{out:?}");
            assert_eq!(
                out.top_logprobs.iter().map(|p| p.0).collect::<Vec<_>>(),
                vec![0, 3]
            );
            assert!((out.top_logprobs[1].1 - raw_logprob(&logits, 3)).abs() < 1e-5);
        }
        // Through `sample`, beside a free row; without `token_logprob` no log-probability.
        let t = Tensor::new(&[logits, logits], &Device::Cpu).unwrap();
        let forced = RowSampling {
            force: Some(1),
            ..RowSampling::greedy()
        };
        let out = sample(t, &[forced, RowSampling::greedy()]).unwrap();
        assert_eq!((out[0].token, out[0].logprob), (1, None));
        assert_eq!(out[1].token, 0);
    }

    /// `sample` sums repeated ids (+2 and +3 on token 1 make it the arg max; either alone
    /// does not) and reports the raw log-probability.
    #[test]
    fn sample_merges_repeated_adjustments() {
        let logits = [0.0f32, -4.0, 0.5];
        let s = RowSampling {
            adjust: vec![(1, 2.0), (2, 0.0), (1, 3.0)],
            token_logprob: true,
            ..RowSampling::greedy()
        };
        let t = Tensor::new(&[logits], &Device::Cpu).unwrap();
        let out = sample(t, std::slice::from_ref(&s)).unwrap();
        assert_eq!(out[0].token, 1);
        assert!(close(out[0].logprob, raw_logprob(&logits, 1)), "{out:?}");
        assert_eq!(
            merge_adjustments(&s.adjust),
            vec![(1, 5.0)],
            "merged, the zero dropped"
        );
        for adjust in [vec![(1, 2.0)], vec![(1, 3.0)]] {
            let s = RowSampling {
                adjust,
                ..RowSampling::greedy()
            };
            assert_eq!(sample_row(&mut logits.to_vec(), &s).0.token, 2);
        }
    }

    #[test]
    fn invalid_adjustments_and_forced_ids_are_errors() {
        let logits = Tensor::new(&[[0f32, 1., 2.]], &Device::Cpu).unwrap();
        let bad = [
            (vec![(3, 1.0)], None, "token 3"),
            (vec![(0, f32::NAN)], None, "not a finite"),
            (vec![(1, f32::INFINITY)], None, "not a finite"),
            (vec![(2, f32::MAX), (2, f32::MAX)], None, "in all"),
            (vec![], Some(3), "token 3"),
        ];
        for (adjust, force, why) in bad {
            let s = RowSampling {
                adjust,
                force,
                ..RowSampling::greedy()
            };
            let err = sample(logits.clone(), &[s]).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
    }

    /// A constrained row picks only allowed tokens, greedy or sampled, and a mask shorter
    /// than the vocabulary allows nothing past its end.
    #[test]
    fn the_allowed_mask_restricts_the_choice() {
        let row: Vec<f32> = (0..70).map(|i| (i % 7) as f32).collect();
        // Allowed: 3, 33 and 64 (the best logit, 6, is at 6, 13, ... and 69, all outside).
        let words = vec![1 << 3, 1 << 1, 1];
        for (t, u) in [(0.0, 0.0), (1.0, 0.1), (1.0, 0.5), (2.0, 0.99)] {
            let s = RowSampling {
                temperature: t,
                uniform: u,
                allowed: Some(words.clone()),
                ..RowSampling::greedy()
            };
            let tok = sample_row(&mut row.clone(), &s).0.token;
            assert!([3, 33, 64].contains(&tok), "T={t} u={u}: {tok}");
        }
        let s = RowSampling {
            allowed: Some(vec![0, 0]),
            ..RowSampling::greedy()
        };
        assert!(mask_allows(&[1 << 5], 5) && !mask_allows(&[1 << 5], 37));
        // Nothing allowed: the arg max of nothing is the first id (the scheduler never asks).
        assert_eq!(sample_row(&mut row.clone(), &s).0.token, 0);
    }
}
