//! Logits processors, applied in the order transformers applies them.

use std::collections::HashSet;

/// transformers' `RepetitionPenaltyLogitsProcessor`: every token in `history` has its logit
/// divided by `penalty` if positive, multiplied if negative.
pub fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let seen: HashSet<u32> = history.iter().copied().collect();
    for t in seen {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

/// transformers' `NoRepeatNGramLogitsProcessor`: bans every token that would complete an
/// n-gram already present in `history`.
pub fn apply_no_repeat_ngram(logits: &mut [f32], history: &[u32], n: usize) {
    if n == 0 || history.len() + 1 < n {
        return;
    }
    let prefix = &history[history.len() + 1 - n..];
    for window in history.windows(n) {
        if &window[..n - 1] == prefix {
            if let Some(l) = logits.get_mut(window[n - 1] as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// Masks the EOS tokens while fewer than `min_new_tokens` tokens were generated.
pub fn apply_min_new_tokens(
    logits: &mut [f32],
    generated: usize,
    min_new_tokens: usize,
    eos: &[u32],
) {
    if generated < min_new_tokens {
        for &e in eos {
            if let Some(l) = logits.get_mut(e as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_penalty_pushes_seen_tokens_down() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn no_repeat_ngram_bans_completions() {
        // history: 1 2 3 1 2 -> the bigram (2, 3) exists, so after "2" token 3 is banned for n=3 ("1 2 3").
        let mut l = vec![0.0; 5];
        apply_no_repeat_ngram(&mut l, &[1, 2, 3, 1, 2], 3);
        assert_eq!(l[3], f32::NEG_INFINITY);
        assert_eq!(l.iter().filter(|x| x.is_infinite()).count(), 1);
    }

    #[test]
    fn min_new_tokens_masks_eos() {
        let mut l = vec![0.0; 4];
        apply_min_new_tokens(&mut l, 1, 2, &[3]);
        assert_eq!(l[3], f32::NEG_INFINITY);
        let mut l = vec![0.0; 4];
        apply_min_new_tokens(&mut l, 2, 2, &[3]);
        assert_eq!(l[3], 0.0);
    }
}
