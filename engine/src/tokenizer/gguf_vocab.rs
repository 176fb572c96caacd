//! Rebuilds a Hugging Face `tokenizers` tokenizer from a GGUF file's `tokenizer.ggml.*` metadata
//! (byte-level BPE: vocabulary, merges, token types, BOS/EOS, add-BOS flag, pre-tokenizer).

use crate::error::{EngineError, Result};
use candle_core::quantized::gguf_file::Value;
use serde_json::json;
use std::collections::HashMap;
use std::str::FromStr;

/// llama.cpp token types that are special (control) or user-defined added tokens.
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// What [`build`] produces.
pub struct BuiltTokenizer {
    pub tokenizer: tokenizers::Tokenizer,
    pub bos_token: String,
    pub eos_token: String,
    pub eos_token_ids: Vec<u32>,
}

fn err(m: impl Into<String>) -> EngineError {
    EngineError::Tokenizer(m.into())
}

fn strings(md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>> {
    let list = md
        .get(key)
        .ok_or_else(|| err(format!("GGUF metadata lacks '{key}'")))?
        .to_vec()
        .map_err(|_| err(format!("GGUF metadata '{key}' is not an array")))?;
    list.iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|_| err(format!("'{key}' holds a non-string")))
        })
        .collect()
}

fn id(md: &HashMap<String, Value>, key: &str) -> Option<u32> {
    md.get(key).and_then(|v| v.to_u32().ok())
}

/// The pre-tokenizer llama.cpp's `tokenizer.ggml.pre` name stands for.
fn pre_tokenizer(pre: &str) -> serde_json::Value {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    match pre {
        "llama-bpe" | "llama3" | "llama-v3" | "dbrx" | "smaug-bpe" => {
            json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"},
             "behavior": "Isolated", "invert": false},
            byte_level(false)]})
        }
        // SmolLM and StarCoder: GPT-2 splitting with every digit on its own.
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        _ => byte_level(true),
    }
}

/// Builds the tokenizer described by GGUF metadata.
pub fn build(md: &HashMap<String, Value>) -> Result<BuiltTokenizer> {
    let model = md
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if model != "gpt2" {
        return Err(err(format!(
            "GGUF tokenizer model '{model}' is not supported (byte-level BPE 'gpt2' is); use a Hugging Face directory with tokenizer.json"
        )));
    }
    let tokens = strings(md, "tokenizer.ggml.tokens")?;
    let merges = strings(md, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = match md.get("tokenizer.ggml.token_type").map(|v| v.to_vec()) {
        Some(Ok(list)) => list.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let pre = md
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let bos = id(md, "tokenizer.ggml.bos_token_id");
    let eos = id(md, "tokenizer.ggml.eos_token_id");
    let add_bos = md
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false);
    let token_name = |id: Option<u32>| {
        id.and_then(|i| tokens.get(i as usize))
            .cloned()
            .unwrap_or_default()
    };
    let (bos_token, eos_token) = (token_name(bos), token_name(eos));

    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            matches!(
                types.get(*i),
                Some(&TOKEN_TYPE_CONTROL) | Some(&TOKEN_TYPE_USER_DEFINED)
            )
        })
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[i] == TOKEN_TYPE_CONTROL})
        })
        .collect();
    let post_processor = match (add_bos, bos) {
        (true, Some(b)) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos_token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos_token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos_token, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos_token.clone(): {"id": bos_token, "ids": [b], "tokens": [bos_token]}}
        }),
        _ => serde_json::Value::Null,
    };
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(&pre),
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    });
    let tokenizer = tokenizers::Tokenizer::from_str(&spec.to_string())
        .map_err(|e| err(format!("GGUF vocabulary: {e}")))?;
    Ok(BuiltTokenizer {
        tokenizer,
        bos_token,
        eos_token,
        eos_token_ids: eos.into_iter().collect(),
    })
}
