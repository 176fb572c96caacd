//! End-to-end tests of the one-shot commands: `liftoff generate` (the real binary on the default
//! model and on the test checkpoints, its JSON output, one-line errors for bad input) and
//! `liftoff kernel-check`.

mod common;

use common::{assert_one_line_error, fixtures, liftoff};
use std::path::{Path, PathBuf};
use std::process::Output;

fn smollm2() -> PathBuf {
    let p = liftoff_engine::cache_dir::default_model_file();
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch_default_model.sh",
        p.display()
    );
    p
}

/// `liftoff generate --model MODEL --prompt x`: for load errors, which come before any prompt.
fn generate_on(model: &str) -> Output {
    liftoff(&["generate", "--model", model, "--prompt", "x"])
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn json_output_with_logprobs() {
    let model = smollm2();
    let out = liftoff(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "The capital of France is",
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
        "--ignore-eos",
        "--logprobs",
        "3",
        "--format",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(
        v["prompt_token_ids"],
        serde_json::json!([504, 3575, 282, 4649, 314])
    );
    let ids = v["token_ids"].as_array().unwrap();
    assert_eq!(ids.len(), 8);
    assert_eq!(v["finish_reason"], "length");
    assert!(
        v["text"].as_str().unwrap().starts_with(" Paris"),
        "{}",
        v["text"]
    );
    assert!(v["prompt_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    let top = v["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), 8);
    for (step, id) in top.iter().zip(ids) {
        let pairs = step.as_array().unwrap();
        assert_eq!(pairs.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(&pairs[0][0], id);
        let lps: Vec<f64> = pairs.iter().map(|p| p[1].as_f64().unwrap()).collect();
        assert!(
            lps.windows(2).all(|w| w[0] >= w[1]) && lps[0] <= 0.0,
            "{lps:?}"
        );
    }
}

#[test]
fn text_output_streams_and_chat_stops_at_eos() {
    let model = smollm2();
    let out = liftoff(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Say hello.",
        "--chat",
        "--temperature",
        "0",
        "--max-new-tokens",
        "64",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.trim().is_empty());
    assert!(
        !text.contains("<|im_end|>"),
        "special tokens are not printed: {text}"
    );
}

#[test]
fn stop_sequences_and_seeded_sampling() {
    let model = smollm2();
    let m = model.to_str().unwrap();
    let run = |seed: &str| {
        let out = liftoff(&[
            "generate",
            "--model",
            m,
            "--prompt",
            "Once upon a time",
            "--temperature",
            "0.9",
            "--top-k",
            "40",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--max-new-tokens",
            "16",
            "--ignore-eos",
            "--format",
            "json",
        ]);
        assert!(out.status.success());
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["token_ids"].clone()
    };
    assert_eq!(run("7"), run("7"), "same seed, same tokens");
    let out = liftoff(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "The capital of France is",
        "--temperature",
        "0",
        "--max-new-tokens",
        "16",
        "--stop",
        ".",
        "--format",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["text"], " Paris");
    assert_eq!(v["finish_reason"], "stop");
}

#[test]
fn hf_directory_model_generates() {
    let dir = fixtures().join("models/tiny-llama2-f32");
    let out = liftoff(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "hello",
        "--chat",
        "--temperature",
        "0",
        "--max-new-tokens",
        "5",
        "--ignore-eos",
        "--format",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 5);
}

#[test]
fn missing_model_file() {
    let out = generate_on("/nonexistent/model.gguf");
    assert_one_line_error(&out, "model not found: /nonexistent/model.gguf");
}

#[test]
fn corrupt_and_truncated_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let garbage = tmp.path().join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a gguf file at all").unwrap();
    let out = generate_on(garbage.to_str().unwrap());
    assert_one_line_error(&out, "invalid GGUF file");

    let bytes = std::fs::read(smollm2()).unwrap();
    let in_metadata = tmp.path().join("cut-metadata.gguf");
    std::fs::write(&in_metadata, &bytes[..100_000]).unwrap();
    let out = generate_on(in_metadata.to_str().unwrap());
    assert_one_line_error(&out, "invalid GGUF file");

    let in_data = tmp.path().join("cut-data.gguf");
    std::fs::write(&in_data, &bytes[..bytes.len() / 2]).unwrap();
    let out = generate_on(in_data.to_str().unwrap());
    assert_one_line_error(&out, "file is truncated: tensor");
}

#[test]
fn corrupt_and_truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    copy_dir(&fixtures().join("models/tiny-llama3-bf16"), &dir);
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 1000]).unwrap();
    let out = generate_on(dir.to_str().unwrap());
    assert_one_line_error(&out, "invalid safetensors file");
    std::fs::write(&st, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    let out = generate_on(dir.to_str().unwrap());
    assert_one_line_error(&out, "invalid safetensors file");
}

fn with_config_edit(edit: impl Fn(&mut serde_json::Value)) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    copy_dir(&fixtures().join("models/tiny-gqa2-f16"), &dir);
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    (tmp, dir)
}

#[test]
fn unsupported_architecture() {
    let (_t, dir) = with_config_edit(|c| {
        c["model_type"] = "gpt2".into();
        c["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    });
    let out = generate_on(dir.to_str().unwrap());
    assert_one_line_error(&out, "unsupported model architecture 'gpt2'");
}

#[test]
fn config_inconsistent_with_weights() {
    let (_t, dir) = with_config_edit(|c| c["hidden_size"] = 96.into());
    let out = generate_on(dir.to_str().unwrap());
    assert_one_line_error(
        &out,
        "tensor 'model.embed_tokens.weight' has shape [512, 64], expected [512, 96]",
    );
    let (_t, dir) = with_config_edit(|c| c["num_key_value_heads"] = 3.into());
    let out = generate_on(dir.to_str().unwrap());
    assert_one_line_error(
        &out,
        "num_attention_heads 8 is not a multiple of num_key_value_heads 3",
    );
}

#[test]
fn bad_sampling_parameter() {
    let out = liftoff(&[
        "generate",
        "--model",
        smollm2().to_str().unwrap(),
        "--prompt",
        "x",
        "--top-p",
        "2",
    ]);
    assert_one_line_error(&out, "top_p");
}

/// `liftoff kernel-check` runs every kernel check on the CPU and says so; an unknown device is
/// a one-line error.
#[test]
fn kernel_check_on_the_cpu() {
    let out = liftoff(&["kernel-check", "--device", "cpu"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for op in [
        "paged-decode",
        "paged-prefill",
        "write-kv",
        "rotary",
        "sample",
    ] {
        assert!(stdout.contains(op), "{op} missing from:\n{stdout}");
    }
    assert!(stdout.contains(", 0 failed"), "{stdout}");
    assert_one_line_error(
        &liftoff(&["kernel-check", "--device", "tpu:1"]),
        "unknown device",
    );
}

/// `liftoff bench bandwidth` times every pass for the time asked: the mean over the stretch is
/// finite, positive and at most the best pass, every pass is listed, and a non-positive time
/// is a one-line error.
#[test]
fn bench_bandwidth_reports_every_pass() {
    let out = liftoff(&["bench", "bandwidth", "--seconds", "0.2", "--mib", "8"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let num = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {v}"));
    let (mean, best, seconds) = (
        num("mean_bytes_per_s"),
        num("best_bytes_per_s"),
        num("seconds"),
    );
    assert!(
        mean.is_finite() && mean > 0.0 && best.is_finite() && mean <= best,
        "{v}"
    );
    assert_eq!(v["bytes_per_pass"].as_u64(), Some(8 << 20), "{v}");
    let passes: Vec<f64> = v["pass_bytes_per_s"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_f64().unwrap())
        .collect();
    assert!(passes.len() >= 2, "{v}");
    assert!(
        passes
            .iter()
            .all(|p| p.is_finite() && *p > 0.0 && *p <= best),
        "{v}"
    );
    // The mean is all bytes over all time: the passes' harmonic mean.
    let harmonic = passes.len() as f64 / passes.iter().map(|p| 1.0 / p).sum::<f64>();
    assert!(
        (harmonic - mean).abs() <= 1e-6 * mean,
        "{harmonic} vs {mean}"
    );
    assert!(seconds > 0.0 && seconds <= 1.0, "{v}");
    for (bad, named) in [
        ("--seconds=0", "--seconds"),
        ("--seconds=-1", "--seconds"),
        ("--seconds=nan", "--seconds"),
        ("--seconds=601", "--seconds"),
        ("--mib=0", "--mib"),
        ("--mib=4097", "--mib"),
    ] {
        assert_one_line_error(&liftoff(&["bench", "bandwidth", bad]), named);
    }
}
