//! Logits processors, as the token lists a row's sampling applies where the logits are
//! (transformers' order: repetition penalty, then OpenAI's additive penalties and biases, then
//! no-repeat n-grams and the minimum length).

use std::collections::BTreeMap;

/// transformers' `RepetitionPenaltyLogitsProcessor` applies to every distinct token in
/// `history` (none when `penalty` is 1).
pub fn penalized_tokens(history: &[u32], penalty: f32) -> Vec<u32> {
    if penalty == 1.0 {
        return Vec::new();
    }
    let mut seen = history.to_vec();
    seen.sort_unstable();
    seen.dedup();
    seen
}

/// A row's additive penalties, from the tokens they count.
#[derive(Debug, Clone, Copy, Default)]
pub struct Penalties<'a> {
    /// The tokens generated so far (OpenAI's penalties count these, not the prompt).
    pub generated: &'a [u32],
    /// The whole sequence so far, prompt and generated (TGI's frequency penalty).
    pub sequence: &'a [u32],
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub relative_frequency_penalty: f32,
}

/// The penalties and `logit_bias` as a row's additive logit adjustments
/// ([`RowSampling::adjust`](crate::sampling::RowSampling::adjust)): for every distinct token
/// `j` of `generated`, OpenAI's `-(count_j * frequency_penalty) - presence_penalty`; for every
/// distinct token `j` of `sequence`, TGI's `-relative_frequency_penalty * count_j / len`; plus
/// `logit_bias[j]` for every biased token (summed where several apply, and where a token is
/// biased twice). Ordered by token; entries that come to exactly 0 are left out, so the list
/// is empty when everything is 0.
pub fn logit_adjustments(p: Penalties, logit_bias: &[(u32, f32)]) -> Vec<(u32, f32)> {
    let mut adjust: BTreeMap<u32, f32> = BTreeMap::new();
    let counts = |tokens: &[u32]| {
        let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
        for &t in tokens {
            *counts.entry(t).or_default() += 1;
        }
        counts
    };
    if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
        for (t, count) in counts(p.generated) {
            adjust.insert(
                t,
                -(count as f32 * p.frequency_penalty) - p.presence_penalty,
            );
        }
    }
    if p.relative_frequency_penalty != 0.0 && !p.sequence.is_empty() {
        let len = p.sequence.len() as f32;
        for (t, count) in counts(p.sequence) {
            *adjust.entry(t).or_default() -= p.relative_frequency_penalty * (count as f32 / len);
        }
    }
    for &(t, bias) in logit_bias {
        *adjust.entry(t).or_default() += bias;
    }
    adjust.into_iter().filter(|a| a.1 != 0.0).collect()
}

/// transformers' `NoRepeatNGramLogitsProcessor`: every token that would complete an n-gram
/// already present in `history`.
pub fn no_repeat_ngram_bans(history: &[u32], n: usize) -> Vec<u32> {
    if n == 0 || history.len() + 1 < n {
        return Vec::new();
    }
    let prefix = &history[history.len() + 1 - n..];
    let mut banned: Vec<u32> = history
        .windows(n)
        .filter(|w| &w[..n - 1] == prefix)
        .map(|w| w[n - 1])
        .collect();
    banned.sort_unstable();
    banned.dedup();
    banned
}

/// The EOS tokens while fewer than `min_new_tokens` tokens were generated.
pub fn min_new_tokens_bans(generated: usize, min_new_tokens: usize, eos: &[u32]) -> Vec<u32> {
    if generated < min_new_tokens {
        eos.to_vec()
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_penalty_lists_distinct_history() {
        assert_eq!(penalized_tokens(&[0, 1, 1, 5], 2.0), vec![0, 1, 5]);
        assert!(penalized_tokens(&[0, 1], 1.0).is_empty());
    }

    /// OpenAI's penalties over `generated` and the biases.
    fn openai(generated: &[u32], f: f32, p: f32, bias: &[(u32, f32)]) -> Vec<(u32, f32)> {
        let penalties = Penalties {
            generated,
            frequency_penalty: f,
            presence_penalty: p,
            ..Default::default()
        };
        logit_adjustments(penalties, bias)
    }

    #[test]
    fn openai_adjustments_count_generated_tokens_and_add_biases() {
        // Token 4 three times, 9 once, 1 twice; 9 and 6 biased.
        let generated = [4, 9, 4, 1, 4, 1];
        let (f, p) = (0.5, 0.25);
        let got = openai(&generated, f, p, &[(9, 2.0), (6, -100.0)]);
        let want = vec![
            (1, -(2.0 * f) - p),
            (4, -(3.0 * f) - p),
            (6, -100.0),
            (9, -(1.0 * f) - p + 2.0),
        ];
        assert_eq!(got.len(), want.len(), "{got:?}");
        for (g, w) in got.iter().zip(&want) {
            assert!(
                g.0 == w.0 && (g.1 - w.1).abs() < 1e-6,
                "{got:?} vs {want:?}"
            );
        }
        // Presence applies once whatever the count; frequency alone scales with it.
        assert_eq!(openai(&[3, 3, 3], 0.0, 1.5, &[]), vec![(3, -1.5)]);
        assert_eq!(openai(&[3, 3, 3], 1.5, 0.0, &[]), vec![(3, -4.5)]);
        // Negative penalties encourage repetition.
        assert_eq!(openai(&[7], -1.0, -1.0, &[]), vec![(7, 2.0)]);
        // Biases alone, with no history; a token biased twice gets the sum.
        assert_eq!(
            openai(&[], 1.0, 1.0, &[(5, 1.0), (2, 3.0), (5, 0.5)]),
            vec![(2, 3.0), (5, 1.5)]
        );
        // Nothing to do: empty.
        assert!(openai(&generated, 0.0, 0.0, &[]).is_empty());
        assert!(openai(&generated, 0.0, 0.0, &[(3, 0.0)]).is_empty());
        assert!(openai(&[], 0.0, 0.0, &[]).is_empty());
    }

    #[test]
    fn tgi_frequency_penalty_counts_the_whole_sequence_relative_to_its_length() {
        // Prompt [5, 5, 7], generated [5]: 5 is 3 of 4 tokens, 7 one of 4.
        let (sequence, generated) = ([5, 5, 7, 5], [5]);
        let penalties = Penalties {
            generated: &generated,
            sequence: &sequence,
            relative_frequency_penalty: 1.0,
            ..Default::default()
        };
        assert_eq!(
            logit_adjustments(penalties, &[]),
            vec![(5, -0.75), (7, -0.25)]
        );
        // With OpenAI's on the generated token and a bias: the terms add up.
        let both = Penalties {
            frequency_penalty: 1.0,
            relative_frequency_penalty: -2.0,
            ..penalties
        };
        assert_eq!(
            logit_adjustments(both, &[(7, 1.0)]),
            vec![(5, -1.0 + 1.5), (7, 0.5 + 1.0)]
        );
        // Nothing generated yet (the first step): the prompt alone counts.
        let first = Penalties {
            generated: &[],
            sequence: &sequence[..3],
            relative_frequency_penalty: 3.0,
            ..Default::default()
        };
        assert_eq!(logit_adjustments(first, &[]), vec![(5, -2.0), (7, -1.0)]);
    }

    #[test]
    fn no_repeat_ngram_bans_completions() {
        // history: 1 2 3 1 2 -> "1 2 3" exists, so after "1 2" token 3 is banned for n=3.
        assert_eq!(no_repeat_ngram_bans(&[1, 2, 3, 1, 2], 3), vec![3]);
        assert_eq!(no_repeat_ngram_bans(&[1, 2, 1], 2), vec![2]);
        assert!(no_repeat_ngram_bans(&[1, 2], 0).is_empty());
    }

    #[test]
    fn min_new_tokens_bans_eos_until_reached() {
        assert_eq!(min_new_tokens_bans(1, 2, &[3]), vec![3]);
        assert!(min_new_tokens_bans(2, 2, &[3]).is_empty());
    }
}
