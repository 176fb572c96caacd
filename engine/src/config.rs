//! Model configuration, read from a Hugging Face `config.json` or from GGUF metadata.

use crate::error::{EngineError, Result};
use serde::Deserialize;

/// How the rotary embedding pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Hugging Face layout: dimension `i` pairs with `i + head_dim / 2`.
    HalfSplit,
    /// llama.cpp's GGUF layout: the Q/K rows are permuted so pairs are adjacent (`2i`, `2i + 1`).
    Interleaved,
}

/// RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Position interpolation: positions divided by `factor`.
    Linear { factor: f32 },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// Per-dimension frequency divisors (llama.cpp's `rope_freqs.weight`), one per rotary pair.
    Factors(Vec<f32>),
}

/// The shape and numerics of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub rope_layout: RopeLayout,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(x) => vec![x],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize, Default)]
struct HfRope {
    #[serde(default, alias = "type")]
    rope_type: Option<String>,
    rope_theta: Option<f32>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f32>,
    rope_scaling: Option<HfRope>,
    rope_parameters: Option<HfRope>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    hidden_act: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}

const SUPPORTED_TYPES: &[&str] = &["llama", "mistral"];

impl LlamaConfig {
    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let hf: HfConfig = serde_json::from_str(text)
            .map_err(|e| EngineError::InvalidConfig(format!("config.json: {e}")))?;
        let model_type = hf.model_type.clone().unwrap_or_default();
        let arch_ok = hf
            .architectures
            .iter()
            .any(|a| a == "LlamaForCausalLM" || a == "MistralForCausalLM");
        if !SUPPORTED_TYPES.contains(&model_type.as_str()) && !arch_ok {
            let name = if model_type.is_empty() {
                hf.architectures.join(",")
            } else {
                model_type
            };
            return Err(EngineError::UnsupportedArchitecture(name));
        }
        if hf.attention_bias || hf.mlp_bias {
            return Err(EngineError::InvalidConfig(
                "attention_bias / mlp_bias are not supported".into(),
            ));
        }
        if let Some(act) = &hf.hidden_act {
            if act != "silu" {
                return Err(EngineError::InvalidConfig(format!(
                    "hidden_act '{act}' is not supported (only silu)"
                )));
            }
        }
        // transformers 5 writes `rope_parameters`; hub checkpoints use `rope_theta` + `rope_scaling`.
        let rope = hf.rope_parameters.or(hf.rope_scaling).unwrap_or_default();
        let rope_theta = rope.rope_theta.or(hf.rope_theta).unwrap_or(10_000.0);
        let rope_scaling = parse_rope_scaling(&rope)?;
        let head_dim = hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1));
        let cfg = LlamaConfig {
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim,
            vocab_size: hf.vocab_size,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta,
            rope_scaling,
            rope_layout: RopeLayout::HalfSplit,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings,
            bos_token_id: hf.bos_token_id,
            eos_token_ids: hf.eos_token_id.map(OneOrMany::into_vec).unwrap_or_default(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that the shapes are consistent, naming the numbers that are not.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::InvalidConfig(m));
        if self.hidden_size == 0
            || self.intermediate_size == 0
            || self.num_hidden_layers == 0
            || self.vocab_size == 0
        {
            return bad(format!(
                "hidden_size {}, intermediate_size {}, num_hidden_layers {} and vocab_size {} must all be positive",
                self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
            ));
        }
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return bad("num_attention_heads and num_key_value_heads must be positive".into());
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even and positive",
                self.head_dim
            ));
        }
        if self.max_position_embeddings == 0 {
            return bad("max_position_embeddings must be positive".into());
        }
        Ok(())
    }

    /// Query heads per KV head (GQA group size).
    pub fn gqa_group(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

fn parse_rope_scaling(rope: &HfRope) -> Result<RopeScaling> {
    let kind = rope.rope_type.as_deref().unwrap_or("default");
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: rope.factor.unwrap_or(1.0),
        }),
        "llama3" => {
            let need = |v: Option<f32>, name: &str| {
                v.ok_or_else(|| {
                    EngineError::InvalidConfig(format!("rope_scaling llama3 lacks {name}"))
                })
            };
            Ok(RopeScaling::Llama3 {
                factor: need(rope.factor, "factor")?,
                low_freq_factor: need(rope.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: need(rope.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: rope
                    .original_max_position_embeddings
                    .ok_or_else(|| {
                        EngineError::InvalidConfig(
                            "rope_scaling llama3 lacks original_max_position_embeddings".into(),
                        )
                    })?,
            })
        }
        other => Err(EngineError::InvalidConfig(format!(
            "rope scaling type '{other}' is not supported (default, linear, llama3)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA3: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama",
      "hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":8,
      "num_key_value_heads":4,"vocab_size":100,"rms_norm_eps":1e-5,"rope_theta":500000.0,
      "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
      "original_max_position_embeddings":8192},"max_position_embeddings":131072,
      "tie_word_embeddings":true,"bos_token_id":1,"eos_token_id":[2,3]}"#;

    #[test]
    fn parses_llama3_config() {
        let c = LlamaConfig::from_hf_json(LLAMA3).unwrap();
        assert_eq!(c.head_dim, 8);
        assert_eq!(c.gqa_group(), 2);
        assert_eq!(c.eos_token_ids, vec![2, 3]);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(c.rope_theta, 500000.0);
    }

    #[test]
    fn reads_transformers5_rope_parameters() {
        let text = LLAMA3.replace(
            r#""rope_theta":500000.0,"rope_scaling""#,
            r#""rope_parameters""#,
        );
        let text = text.replace(
            r#""rope_type":"llama3""#,
            r#""rope_type":"llama3","rope_theta":250000.0"#,
        );
        let c = LlamaConfig::from_hf_json(&text).unwrap();
        assert_eq!(c.rope_theta, 250000.0);
    }

    #[test]
    fn rejects_inconsistent_heads() {
        let text = LLAMA3.replace(r#""num_key_value_heads":4"#, r#""num_key_value_heads":3"#);
        let err = LlamaConfig::from_hf_json(&text).unwrap_err().to_string();
        assert!(
            err.contains("num_attention_heads 8 is not a multiple of num_key_value_heads 3"),
            "{err}"
        );
    }

    #[test]
    fn rejects_unknown_architecture() {
        let text = LLAMA3
            .replace(r#""model_type":"llama""#, r#""model_type":"gpt2""#)
            .replace("LlamaForCausalLM", "GPT2LMHeadModel");
        let err = LlamaConfig::from_hf_json(&text).unwrap_err().to_string();
        assert!(
            err.contains("unsupported model architecture 'gpt2'"),
            "{err}"
        );
    }
}
