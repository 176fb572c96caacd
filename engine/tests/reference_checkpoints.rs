//! Random Llama checkpoints in Hugging Face format (scripts/make_test_checkpoints.py: f32 sharded
//! over two files with an index; bf16 with tied embeddings and llama3 RoPE scaling; f16 with 2 KV
//! heads) against transformers' float32 outputs (scripts/make_reference.py).
//!
//! Tolerance: both sides compute in f32 from the same (upcast) weights; with random weights of
//! std 0.5 the logits reach magnitudes of ~10-50, so a logit may be off by 1e-4 relative to the
//! row's largest |logit| plus 1e-4 absolute, a difference of two logits by twice that; greedy
//! tokens identical. Everything goes through the scheduler, as served.

mod common;

use common::*;
use liftoff_engine::sampling::SamplingParams;
use liftoff_engine::{Engine, EngineOptions};

fn check(name: &str) {
    let dir = fixtures().join("models").join(name);
    let mut e =
        Engine::load(&EngineOptions::new(&dir)).unwrap_or_else(|err| panic!("{name}: {err}"));
    for case in load_ref(&format!("{name}.json")).cases {
        let mut params = SamplingParams::greedy(case.greedy_ids.len());
        params.ignore_eos = true;
        let g = e.generate(&case.prompt_ids, &params, |_| {}).unwrap();
        assert_eq!(
            g.token_ids, case.greedy_ids,
            "{name}/{}: greedy tokens",
            case.name
        );
        let full: Vec<u32> = case
            .prompt_ids
            .iter()
            .chain(&case.greedy_ids)
            .copied()
            .collect();
        // Through the scheduler, as served: every position's top-20 log-probabilities,
        // compared as differences from the reference's top token (the log-sum-exp cancels).
        let rows = e.prompt_logprobs(&full, 20).unwrap();
        for (pos, (row, refs)) in rows.iter().zip(&case.topk).enumerate() {
            let scale = refs.iter().map(|r| r.1.abs()).fold(1.0f32, f32::max);
            let err = max_topk_error(std::slice::from_ref(row), std::slice::from_ref(refs));
            assert!(
                err <= 2e-4 * scale + 2e-4,
                "{name}/{} position {pos}: logit differences off by {err}",
                case.name
            );
        }
    }
}

#[test]
fn llama2_style_f32_sharded_files() {
    check("tiny-llama2-f32");
}

#[test]
fn llama3_style_bf16_tied_rope_scaled() {
    check("tiny-llama3-bf16");
}

#[test]
fn gqa2_f16() {
    check("tiny-gqa2-f16");
}
