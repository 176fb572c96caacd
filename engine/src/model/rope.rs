//! Rotary position embeddings: frequency tables (with Llama 3 / linear / per-dimension scaling)
//! applied in place to flat `[tokens, heads, head_dim]` buffers.

use crate::config::{LlamaConfig, RopeLayout, RopeScaling};

/// Precomputed cos/sin tables for positions `0..max_positions`.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    layout: RopeLayout,
    max_positions: usize,
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
    /// Tables for `max_positions` positions.
    pub fn new(cfg: &LlamaConfig, max_positions: usize) -> Self {
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
        Self {
            cos,
            sin,
            half,
            layout: cfg.rope_layout,
            max_positions,
        }
    }

    /// Largest position + 1 the tables cover.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Rotates `x` (`[tokens, heads, head_dim]`, flat) in place; `positions[t]` is token t's.
    pub fn apply(&self, x: &mut [f32], heads: usize, positions: &[u32]) {
        let d = 2 * self.half;
        for (t, &pos) in positions.iter().enumerate() {
            let base = pos as usize * self.half;
            let cos = &self.cos[base..base + self.half];
            let sin = &self.sin[base..base + self.half];
            let tok = &mut x[t * heads * d..(t + 1) * heads * d];
            for head in tok.chunks_exact_mut(d) {
                match self.layout {
                    RopeLayout::HalfSplit => {
                        let (a, b) = head.split_at_mut(self.half);
                        for i in 0..self.half {
                            let (x1, x2) = (a[i], b[i]);
                            a[i] = x1 * cos[i] - x2 * sin[i];
                            b[i] = x2 * cos[i] + x1 * sin[i];
                        }
                    }
                    RopeLayout::Interleaved => {
                        for i in 0..self.half {
                            let (x1, x2) = (head[2 * i], head[2 * i + 1]);
                            head[2 * i] = x1 * cos[i] - x2 * sin[i];
                            head[2 * i + 1] = x2 * cos[i] + x1 * sin[i];
                        }
                    }
                }
            }
        }
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
    fn interleaved_equals_half_split_on_permuted_input() {
        let mut c = cfg();
        let half = RotaryEmbedding::new(&c, 8);
        c.rope_layout = RopeLayout::Interleaved;
        let inter = RotaryEmbedding::new(&c, 8);
        let x: Vec<f32> = (0..8).map(|i| i as f32 * 0.3 - 1.0).collect();
        // llama.cpp's permutation: half-split dim i -> 2i, dim i+4 -> 2i+1.
        let mut p = vec![0f32; 8];
        for i in 0..4 {
            p[2 * i] = x[i];
            p[2 * i + 1] = x[i + 4];
        }
        let mut a = x.clone();
        half.apply(&mut a, 1, &[5]);
        inter.apply(&mut p, 1, &[5]);
        for i in 0..4 {
            assert!((a[i] - p[2 * i]).abs() < 1e-6);
            assert!((a[i + 4] - p[2 * i + 1]).abs() < 1e-6);
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
