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
//!    their mass), then the locally typical set of those (`typical_p`: the tokens whose
//!    surprisal `-ln q_i` (`q` renormalised over them) is closest to its mean, the entropy,
//!    taken in that order until `typical_p` of their mass is held, ties kept), as transformers'
//!    and TGI's warpers do in that order. The CUDA kernel has no typical step: a batch with a
//!    typical row is sampled on the CPU (its logits copied there);
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
    /// Typical sampling's mass (Meister et al., transformers' `typical_p`); 1 keeps every token.
    #[serde(default = "one")]
    pub typical_p: f32,
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

fn one() -> f32 {
    1.0
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
        let typical_p = self.typical_p > 0.0 && self.typical_p <= 1.0;
        let penalty = self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite();
        temperature
            && top_p
            && typical_p
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
            typical_p: 1.0,
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
    // The CUDA kernel has no typical step (see the module's doc).
    let logits = if clean.iter().any(|s| s.typical_p < 1.0) {
        logits.to_device(&candle_core::Device::Cpu)?
    } else {
        logits
    };
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
    let nucleus = |k: u32| k != ninf && k >= thresh;
    let typical = (spec.typical_p < 1.0).then(|| {
        let (keep, m) = typical_set(&keys, &w, nucleus, spec.typical_p);
        margin = margin.min(m);
        keep
    });
    let kept = |i: usize| nucleus(keys[i]) && typical.as_ref().is_none_or(|keep| keep[i]);
    let total: f32 = (0..vocab).filter(|&i| kept(i)).map(|i| w[i]).sum();
    let target = spec.uniform * total;
    let mut acc = 0f32;
    for (i, &p) in w.iter().enumerate() {
        if !kept(i) {
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

/// transformers' `TypicalLogitsWarper` over the tokens `nucleus` keeps (weights `w`):
/// `q_i = w_i / total`, the entropy `H = -sum q ln q`, each token's score `|-ln q_i - H|`;
/// the tokens in increasing score (then id) until the running sum of `q` reaches `mass`
/// (the one that reaches it included), and every token whose score ties with that one's.
/// Returns which tokens stay (indexed by token) and how far the running sum came from `mass`
/// at the cut, like top-p's margin.
fn typical_set(
    keys: &[u32],
    w: &[f32],
    nucleus: impl Fn(u32) -> bool,
    mass: f32,
) -> (Vec<bool>, f32) {
    let cand: Vec<usize> = (0..w.len())
        .filter(|&i| nucleus(keys[i]) && w[i] > 0.0)
        .collect();
    let total: f32 = cand.iter().map(|&i| w[i]).sum();
    let ln_total = total.ln();
    let entropy: f32 = cand
        .iter()
        .map(|&i| -(w[i] / total) * (w[i].ln() - ln_total))
        .sum();
    let mut order: Vec<(f32, usize)> = cand
        .iter()
        .map(|&i| (((ln_total - w[i].ln()) - entropy).abs(), i))
        .collect();
    order.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut acc, mut margin, mut cut) = (0f32, f32::INFINITY, f32::INFINITY);
    for (n, &(score, i)) in order.iter().enumerate() {
        let before = acc;
        acc += w[i] / total;
        if acc >= mass || n + 1 == order.len() {
            margin = (mass - before).abs().min((acc - mass).abs());
            cut = score;
            break;
        }
    }
    let mut keep = vec![false; w.len()];
    for &(_, i) in order.iter().take_while(|o| o.0 <= cut) {
        keep[i] = true;
    }
    (keep, margin)
}

#[cfg(test)]
mod tests;
