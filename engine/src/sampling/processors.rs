//! Logits processors, as the token lists a row's sampling applies where the logits are
//! (transformers' order: repetition penalty, then no-repeat n-grams and the minimum length).

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
