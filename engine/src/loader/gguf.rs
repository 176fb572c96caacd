//! GGUF files (llama.cpp): metadata through candle's reader, tensor data through an mmap.

use super::slicing::MatrixLayout;
use super::{expect_shape, MatrixWeight, Slice, WeightFormat, WeightSource};
use crate::config::{LlamaConfig, RopeLayout, RopeScaling};
use crate::error::{EngineError, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A GGUF model file, memory-mapped.
pub struct GgufSource {
    path: PathBuf,
    content: Content,
    mmap: memmap2::Mmap,
    config: LlamaConfig,
    device: Device,
}

impl GgufSource {
    /// Opens and validates a GGUF file: header, metadata, and that every tensor lies inside the file.
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        let invalid = |reason: String| EngineError::InvalidGguf {
            path: path.to_path_buf(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
        let mut reader = std::io::BufReader::new(&file);
        let content =
            Content::read(&mut reader).map_err(|e| invalid(crate::error::candle_message(&e)))?;
        // SAFETY: the file is opened read-only; a model file changed while serving is not supported.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| EngineError::io(path, e))?;
        let file_len = mmap.len() as u64;
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            if elems % block != 0 {
                return Err(invalid(format!(
                    "tensor '{name}' has {elems} elements, not a multiple of its block size {block}"
                )));
            }
            let size = (elems / block * info.ggml_dtype.type_size()) as u64;
            let end = content.tensor_data_offset + info.offset + size;
            if end > file_len {
                return Err(invalid(format!(
                    "file is truncated: tensor '{name}' ends at byte {end} but the file has {file_len} bytes"
                )));
            }
        }
        let config = config_from_metadata(&content.metadata, &content)?;
        let mut source = Self {
            path: path.to_path_buf(),
            content,
            mmap,
            config,
            device: device.clone(),
        };
        if let Some(factors) = source.rope_factors()? {
            source.config.rope_scaling = RopeScaling::Factors(factors);
        }
        Ok(source)
    }

    /// GGUF metadata (tokenizer, chat template, ...).
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// Per-dimension RoPE frequency divisors stored by llama.cpp for Llama 3.1 (`rope_freqs.weight`).
    fn rope_factors(&self) -> Result<Option<Vec<f32>>> {
        if !self.content.tensor_infos.contains_key("rope_freqs.weight") {
            return Ok(None);
        }
        let q = self.qtensor("rope_freqs.weight", &Slice::All)?;
        Ok(Some(
            q.dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        ))
    }

    fn info(
        &self,
        hf_name: &str,
    ) -> Result<(&str, &candle_core::quantized::gguf_file::TensorInfo)> {
        let name = gguf_name(hf_name);
        let (k, v) = self
            .content
            .tensor_infos
            .get_key_value(name.as_str())
            .ok_or_else(|| EngineError::MissingTensor(format!("{hf_name} ({name})")))?;
        Ok((k.as_str(), v))
    }

    fn qtensor(&self, gguf: &str, slice: &Slice) -> Result<QTensor> {
        let info = self
            .content
            .tensor_infos
            .get(gguf)
            .ok_or_else(|| EngineError::MissingTensor(gguf.to_string()))?;
        let dtype = info.ggml_dtype;
        let dims = info.shape.dims().to_vec();
        let start = (self.content.tensor_data_offset + info.offset) as usize;
        let elems = info.shape.elem_count();
        let size = elems / dtype.block_size() * dtype.type_size();
        let data = &self.mmap[start..start + size];
        let (bytes, shape): (Cow<[u8]>, Vec<usize>) = match (slice, dims.as_slice()) {
            (Slice::All, _) => (Cow::Borrowed(data), dims.clone()),
            (Slice::Rows(r), [rows, cols]) | (Slice::Cols(r), [rows, cols]) => {
                let layout = MatrixLayout {
                    rows: *rows,
                    cols: *cols,
                    unit_elems: dtype.block_size(),
                    unit_bytes: dtype.type_size(),
                };
                if let Slice::Rows(_) = slice {
                    if r.end > *rows {
                        return Err(EngineError::Parallel(format!(
                            "rows {r:?} out of {rows} in {gguf}"
                        )));
                    }
                    (Cow::Borrowed(layout.rows(data, r)), vec![r.len(), *cols])
                } else {
                    if r.end > *cols || !layout.cols_aligned(r) {
                        return Err(EngineError::Parallel(format!(
                            "cannot split columns {r:?} of {gguf} ({cols} columns, {dtype:?} blocks of {})",
                            dtype.block_size()
                        )));
                    }
                    (Cow::Owned(layout.cols(data, r)), vec![*rows, r.len()])
                }
            }
            _ => {
                return Err(EngineError::InvalidGguf {
                    path: self.path.clone(),
                    reason: format!("tensor '{gguf}' is not a matrix: {dims:?}"),
                })
            }
        };
        let storage = QStorage::from_data(bytes, &self.device, dtype)?;
        Ok(QTensor::new(storage, shape)?)
    }
}

impl WeightSource for GgufSource {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn contains(&self, name: &str) -> bool {
        self.content
            .tensor_infos
            .contains_key(gguf_name(name).as_str())
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.info(name)?.1.shape.dims().to_vec())
    }

    fn matrix(&self, name: &str, slice: &Slice, format: WeightFormat) -> Result<MatrixWeight> {
        let (gguf, info) = self.info(name)?;
        let dense_type = matches!(
            info.ggml_dtype,
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        );
        let q = self.qtensor(gguf, slice)?;
        match format {
            WeightFormat::Quantized(_) if !dense_type => Ok(MatrixWeight::Quantized(q)),
            _ => Ok(MatrixWeight::Dense(
                q.dequantize(&self.device)?
                    .to_dtype(format.activation_dtype())?,
            )),
        }
    }

    fn vector(&self, name: &str) -> Result<Tensor> {
        let (gguf, info) = self.info(name)?;
        if info.shape.rank() != 1 {
            return Err(EngineError::ShapeMismatch {
                name: name.into(),
                expected: vec![info.shape.elem_count()],
                actual: info.shape.dims().to_vec(),
            });
        }
        Ok(self
            .qtensor(gguf, &Slice::All)?
            .dequantize(&self.device)?
            .to_dtype(DType::F32)?)
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

/// Maps a Hugging Face Llama tensor name to llama.cpp's GGUF name.
pub fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    if let Some(rest) = hf.strip_prefix("model.layers.") {
        if let Some((idx, tail)) = rest.split_once('.') {
            let mapped = match tail {
                "input_layernorm.weight" => "attn_norm.weight",
                "self_attn.q_proj.weight" => "attn_q.weight",
                "self_attn.k_proj.weight" => "attn_k.weight",
                "self_attn.v_proj.weight" => "attn_v.weight",
                "self_attn.o_proj.weight" => "attn_output.weight",
                "post_attention_layernorm.weight" => "ffn_norm.weight",
                "mlp.gate_proj.weight" => "ffn_gate.weight",
                "mlp.up_proj.weight" => "ffn_up.weight",
                "mlp.down_proj.weight" => "ffn_down.weight",
                _ => return hf.to_string(),
            };
            return format!("blk.{idx}.{mapped}");
        }
    }
    hf.to_string()
}

fn meta_u32(md: &HashMap<String, Value>, key: &str) -> Result<Option<u32>> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => v
            .to_u32()
            .or_else(|_| v.to_u64().map(|x| x as u32))
            .or_else(|_| v.to_i32().map(|x| x as u32))
            .map(Some)
            .map_err(|_| {
                EngineError::InvalidConfig(format!("GGUF metadata '{key}' is not an integer"))
            }),
    }
}

fn meta_f32(md: &HashMap<String, Value>, key: &str) -> Result<Option<f32>> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => v.to_f32().map(Some).map_err(|_| {
            EngineError::InvalidConfig(format!("GGUF metadata '{key}' is not a float"))
        }),
    }
}

fn config_from_metadata(md: &HashMap<String, Value>, content: &Content) -> Result<LlamaConfig> {
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if arch != "llama" && arch != "mistral" {
        return Err(EngineError::UnsupportedArchitecture(arch));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let req = |k: &str| -> Result<usize> {
        meta_u32(md, &key(k))?
            .map(|v| v as usize)
            .ok_or_else(|| EngineError::InvalidConfig(format!("GGUF metadata lacks '{}'", key(k))))
    };
    let hidden = req("embedding_length")?;
    let heads = req("attention.head_count")?;
    let kv_heads = meta_u32(md, &key("attention.head_count_kv"))?.map_or(heads, |v| v as usize);
    let head_dim =
        meta_u32(md, &key("attention.key_length"))?.map_or(hidden / heads.max(1), |v| v as usize);
    let tokens_len = md
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.len());
    let vocab = match meta_u32(md, &key("vocab_size"))? {
        Some(v) => v as usize,
        None => tokens_len.ok_or_else(|| {
            EngineError::InvalidConfig("GGUF metadata lacks a vocabulary size".into())
        })?,
    };
    let eos = meta_u32(md, "tokenizer.ggml.eos_token_id")?;
    let cfg = LlamaConfig {
        hidden_size: hidden,
        intermediate_size: req("feed_forward_length")?,
        num_hidden_layers: req("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        vocab_size: vocab,
        rms_norm_eps: meta_f32(md, &key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5)
            as f64,
        rope_theta: meta_f32(md, &key("rope.freq_base"))?.unwrap_or(10_000.0),
        rope_scaling: match meta_f32(md, &key("rope.scaling.factor"))? {
            Some(f)
                if f != 1.0
                    && md
                        .get(&key("rope.scaling.type"))
                        .and_then(|v| v.to_string().ok())
                        .is_some_and(|s| s == "linear") =>
            {
                RopeScaling::Linear { factor: f }
            }
            _ => RopeScaling::None,
        },
        rope_layout: RopeLayout::Interleaved,
        max_position_embeddings: req("context_length").unwrap_or(4096),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        bos_token_id: meta_u32(md, "tokenizer.ggml.bos_token_id")?,
        eos_token_ids: eos.into_iter().collect(),
    };
    cfg.validate()?;
    // Fail early on a GGUF whose tensors disagree with its metadata.
    if let Some(info) = content.tensor_infos.get("token_embd.weight") {
        expect_shape(
            "token_embd.weight",
            info.shape.dims(),
            &[cfg.vocab_size, cfg.hidden_size],
        )?;
    }
    Ok(cfg)
}
