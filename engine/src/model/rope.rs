//! Rotary position embeddings: frequency tables (with Llama 3 / linear / per-dimension scaling)
//! applied in place to `[tokens, heads, head_dim]` tensors by `liftoff-kernels`.

use crate::config::{LlamaConfig, RopeLayout, RopeScaling};
use crate::error::Result;
use candle_core::{Device, Tensor};
use liftoff_kernels::{rotary_embedding, PagedLayout, RotaryTables};

/// Precomputed cos/sin tables for positions `0..max_positions`, on the model's device.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    tables: RotaryTables,
}

/// The inverse frequencies after scaling, computed in f32 as transformers does.
pub fn inv_frequencies(cfg: &LlamaConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    let base: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f32 / d as f32))
        .collect();
    match &cfg.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Factors(factors) => base.iter().zip(factors).map(|(f, s)| f / s).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old = *original_max_position_embeddings as f32;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

impl RotaryEmbedding {
    /// Tables for `max_positions` positions on `device`.
    pub fn new(cfg: &LlamaConfig, max_positions: usize, device: &Device) -> Result<Self> {
        let inv = inv_frequencies(cfg);
        let half = inv.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for &f in &inv {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let interleaved = cfg.rope_layout == RopeLayout::Interleaved;
        Ok(Self {
            tables: RotaryTables::new(&cos, &sin, half, interleaved, device)?,
        })
    }

    /// Largest position + 1 the tables cover.
    pub fn max_positions(&self) -> usize {
        self.tables.max_positions()
    }

    /// Rotates `x` (`[tokens, heads, head_dim]`, contiguous) in place by the step's positions.
    pub fn apply(&self, x: &Tensor, layout: &PagedLayout) -> Result<()> {
        Ok(rotary_embedding(x, &self.tables, layout)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LlamaConfig {
        LlamaConfig {
            hidden_size: 8,
            intermediate_size: 8,
            num_hidden_layers: 1,
            num_attention_heads: 1,
            num_key_value_heads: 1,
            head_dim: 8,
            vocab_size: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            rope_layout: RopeLayout::HalfSplit,
            max_position_embeddings: 16,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies() {
        let mut base = cfg();
        base.rope_theta = 500_000.0;
        let mut c = base.clone();
        c.rope_scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let plain = inv_frequencies(&base);
        let scaled = inv_frequencies(&c);
        assert_eq!(plain[0], scaled[0]);
        assert!((scaled[3] - plain[3] / 8.0).abs() < 1e-9);
    }
}
