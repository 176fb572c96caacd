//! SmolLM2-135M-Instruct (the default GGUF) against Hugging Face transformers' float32 run on
//! the same file (fixtures from scripts/make_reference.py).
//!
//! Tolerances. The f32 path (weights dequantized exactly as transformers does, f32 math) differs
//! from transformers only by float summation order: MODELS.md measured two independent f32
//! paths within 1e-4 of each other, and the smallest greedy top-1/top-2 margin over varied
//! prompts at 0.0045. We allow 5e-4 on every top-10 logit (5x the expected noise, 9x below the
//! smallest margin; 7e-5 is observed), and demand identical greedy tokens. A layout mistake (Q/K permutation,
//! RoPE pairing) moves logits by whole units, far outside this.
//!
//! The quantized path (Q4_1 weights, activations quantized to 8 bits as llama.cpp does)
//! cannot match exactly (MODELS.md: logits move by 0.25 to 1.1), so it is checked statistically
//! against the same f32 reference: top-1 agreement and top-10 overlap over every position; so
//! is the dense bf16 path.

mod common;

use common::*;
use liftoff_engine::sampling::SamplingParams;
use liftoff_engine::tokenizer::ChatMessage;
use liftoff_engine::{DTypeChoice, Engine, EngineOptions};

fn engine(dtype: DTypeChoice) -> Engine {
    let mut opts = EngineOptions::new(smollm2_gguf());
    opts.dtype = dtype;
    opts.max_seq_len = Some(512);
    Engine::load(&opts).expect("load SmolLM2")
}

#[derive(serde::Deserialize)]
struct TokCase {
    text: String,
    ids: Vec<u32>,
}
#[derive(serde::Deserialize)]
struct ChatExample {
    user: String,
    rendered: String,
}
#[derive(serde::Deserialize)]
struct TokFile {
    cases: Vec<TokCase>,
    chat_example: ChatExample,
}

#[test]
fn tokenizer_and_chat_template_match_transformers() {
    let e = engine(DTypeChoice::Auto);
    let tok = e.tokenizer();
    let f: TokFile = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/smollm2_tokenizer.json")).unwrap(),
    )
    .unwrap();
    for c in &f.cases {
        assert_eq!(
            tok.encode(&c.text, true).unwrap(),
            c.ids,
            "ids of {:?}",
            c.text
        );
        // Round trip (special tokens kept).
        assert_eq!(
            tok.decode(&c.ids, false).unwrap(),
            c.text,
            "decode of {:?}",
            c.text
        );
    }
    let rendered = tok
        .apply_chat_template(&[ChatMessage::new("user", &f.chat_example.user)], true)
        .unwrap();
    assert_eq!(rendered, f.chat_example.rendered);
    assert_eq!(tok.eos_token_ids(), &[2]);
}

#[test]
fn f32_path_matches_transformers_logits_and_greedy_tokens() {
    let mut e = engine(DTypeChoice::F32);
    for case in load_ref("smollm2_f32.json").cases {
        let prompt = case.prompt.as_deref().unwrap();
        let ids = e
            .tokenizer()
            .encode_prompt(prompt, case.chat.unwrap_or(false))
            .unwrap();
        assert_eq!(ids, case.prompt_ids, "prompt ids of {}", case.name);
        let mut params = SamplingParams::greedy(case.greedy_ids.len());
        params.ignore_eos = true;
        let g = e.generate(&ids, &params, |_| {}).unwrap();
        assert_eq!(
            g.token_ids, case.greedy_ids,
            "greedy tokens of {}",
            case.name
        );
        let full: Vec<u32> = case
            .prompt_ids
            .iter()
            .chain(&case.greedy_ids)
            .copied()
            .collect();
        // Through the scheduler, as served: every position's top-20 log-probabilities.
        let rows = e.prompt_logprobs(&full, 20).unwrap();
        let err = max_topk_error(&rows, &case.topk);
        println!("{}: max top-10 logit-difference error {err:.2e}", case.name);
        // Logits agree within 5e-4 (f32 on both sides, summation order differs); a difference
        // of two of them within twice that.
        assert!(err < 1e-3, "{}: top-10 logits differ by {err}", case.name);
    }
}

/// Top-1 agreement and top-10 overlap with the f32 reference over every position of every
/// case, through the scheduler as served (the top-20 log-probabilities, most likely first).
fn agreement(e: &mut Engine) -> (f64, f64, usize) {
    let (mut positions, mut top1, mut overlap) = (0usize, 0usize, 0usize);
    for case in load_ref("smollm2_f32.json").cases {
        let full: Vec<u32> = case
            .prompt_ids
            .iter()
            .chain(&case.greedy_ids)
            .copied()
            .collect();
        let rows = e.prompt_logprobs(&full, 20).unwrap();
        for (row, refs) in rows.iter().zip(&case.topk) {
            positions += 1;
            assert!(
                row.len() == 20 && row.iter().all(|p| p.1.is_finite()),
                "{row:?}"
            );
            if row[0].0 == refs[0].0 {
                top1 += 1;
            }
            let ours: std::collections::HashSet<u32> = row[..10].iter().map(|p| p.0).collect();
            overlap += refs.iter().filter(|(id, _)| ours.contains(id)).count();
        }
    }
    let top1_rate = top1 as f64 / positions as f64;
    let overlap_rate = overlap as f64 / (positions * 10) as f64;
    (top1_rate, overlap_rate, positions)
}

#[test]
fn quantized_path_agrees_statistically() {
    let (top1_rate, overlap_rate, positions) = agreement(&mut engine(DTypeChoice::Auto));
    println!("Q4_1 vs f32 reference: top-1 agreement {top1_rate:.3}, top-10 overlap {overlap_rate:.3} over {positions} positions");
    // The floors are what the path measured before the int8 GEMM (97.3 % and 96.7 %): a kernel
    // change may not lose accuracy.
    assert!(top1_rate >= 0.973, "top-1 agreement {top1_rate}");
    assert!(overlap_rate >= 0.96, "top-10 overlap {overlap_rate}");
}

/// The dense bf16 path (the weights rounded to bf16, f32 activations and arithmetic, an f16
/// KV cache) against the f32 reference, statistically as the quantized path (bf16 weights flip
/// near-ties). It measured 99.5 % top-1 and 99.5 % top-10 overlap (one position of 183 off);
/// with bf16 activations it was 97.8 % / 97.7 %, which the floors of 98.5 % (two positions
/// more) would catch.
#[test]
fn bf16_path_agrees_statistically() {
    let (top1_rate, overlap_rate, positions) = agreement(&mut engine(DTypeChoice::Bf16));
    println!("bf16 vs f32 reference: top-1 agreement {top1_rate:.3}, top-10 overlap {overlap_rate:.3} over {positions} positions");
    assert!(top1_rate >= 0.985, "top-1 agreement {top1_rate}");
    assert!(overlap_rate >= 0.985, "top-10 overlap {overlap_rate}");
}

/// The comparison helpers fail on a NaN or an infinity anywhere (f32::max would skip a NaN).
#[test]
fn comparisons_fail_on_nan_and_infinity() {
    let refs = vec![vec![(0u32, 1.0f32), (2, 0.5)]];
    // Log-probabilities: the logits less a log-sum-exp of 3.
    let ours = |a: f32, b: f32| vec![vec![(0u32, a - 3.0), (2, b - 3.0), (1, -9.0)]];
    assert!(max_topk_error(&ours(1.0, 0.5), &refs) < 1e-6);
    assert!((max_topk_error(&ours(1.0, 0.25), &refs) - 0.25).abs() < 1e-6);
    assert_eq!(
        max_topk_error(&[vec![(0, -2.0), (1, -3.0)]], &refs),
        f32::INFINITY,
        "a reference token missing from ours"
    );
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        assert_eq!(max_topk_error(&ours(1.0, bad), &refs), f32::INFINITY);
        assert_eq!(max_topk_error(&ours(bad, 0.5), &refs), f32::INFINITY);
        assert_eq!(worst([0.1, bad, 0.2]), f32::INFINITY);
        assert!(std::panic::catch_unwind(|| argmax(&[0.0, bad, 1.0])).is_err());
    }
}
