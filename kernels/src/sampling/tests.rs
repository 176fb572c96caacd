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

/// Typical sampling on `q = [0.5, 0.25, 0.125, 0.125]`: entropy `1.75 ln 2`, surprisals `1, 2, 3,
/// 3 (x ln 2)`, so by score the order is token 1 (0.25 ln 2), token 0 (0.75), then tokens 2 and
/// 3 (1.25, tied); running sums 0.25, 0.75, 1.0. A mass up to 0.25 keeps token 1 alone (not
/// the arg max), up to 0.75 tokens 1 and 0 (drawn 1:2), above that every token. After top-k
/// 2 the renormalised `[2/3, 1/3]` puts token 0 first.
#[test]
fn typical_p_keeps_the_tokens_nearest_the_entropy() {
    let logits: Vec<f32> = [0.5f32, 0.25, 0.125, 0.125]
        .iter()
        .map(|p| p.ln() + 3.0)
        .collect();
    let typical = |mass: f32, top_k: u32| RowSampling {
        typical_p: mass,
        ..spec(1.0, top_k, 1.0)
    };
    let set = |s: &RowSampling| -> std::collections::BTreeSet<u32> {
        draw(&logits, s, 9, 400).into_iter().collect()
    };
    assert_eq!(set(&typical(0.2, 0)), [1].into());
    assert_eq!(set(&typical(0.5, 0)), [0, 1].into());
    assert_eq!(set(&typical(0.8, 0)), [0, 1, 2, 3].into());
    assert_eq!(set(&typical(1.0, 0)), [0, 1, 2, 3].into());
    assert_eq!(set(&typical(0.5, 2)), [0].into());
    // Within the kept set the draw follows the renormalised probabilities (2/3 for token 0).
    let n = 6000;
    let tokens = draw(&logits, &typical(0.5, 0), 11, n);
    let freq = tokens.iter().filter(|&&t| t == 0).count() as f32 / n as f32;
    // Binomial standard deviation at n = 6000 is 0.0061; 4 sigma.
    assert!((freq - 2.0 / 3.0).abs() < 0.025, "{freq}");
    // Out of range: refused.
    for bad in [0.0, -0.5, 1.5, f32::NAN] {
        let logits = Tensor::new(&[[0.0f32, 1.0]], &Device::Cpu).unwrap();
        let err = sample(logits, &[typical(bad, 0)]).unwrap_err().to_string();
        assert!(err.contains("invalid parameters"), "{bad}: {err}");
    }
}
