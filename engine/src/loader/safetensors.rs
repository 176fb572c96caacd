//! Hugging Face model directories: `config.json` plus one or many `*.safetensors` files
//! (with `model.safetensors.index.json`), memory-mapped; slices are cut from the mapping.

use super::slicing::MatrixLayout;
use super::{MatrixWeight, Slice, WeightFormat, WeightSource};
use crate::config::LlamaConfig;
use crate::error::{EngineError, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, TensorInfo};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

struct MappedFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

/// A Hugging Face model directory.
pub struct SafetensorsSource {
    files: Vec<MappedFile>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
    config: LlamaConfig,
    device: Device,
}

impl SafetensorsSource {
    /// Opens `config.json` and every safetensors file the directory's index names.
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| EngineError::io(&config_path, e))?;
        let config = LlamaConfig::from_hf_json(&text)?;
        let files = safetensors_files(dir)?;
        if files.is_empty() {
            return Err(EngineError::InvalidSafetensors {
                path: dir.to_path_buf(),
                reason: "no *.safetensors files in the directory".into(),
            });
        }
        let mut mapped = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let file = std::fs::File::open(&path).map_err(|e| EngineError::io(&path, e))?;
            // SAFETY: read-only mapping of a model file that is not modified while in use.
            let mmap =
                unsafe { memmap2::Mmap::map(&file) }.map_err(|e| EngineError::io(&path, e))?;
            let (header, metadata) =
                SafeTensors::read_metadata(&mmap).map_err(|e| EngineError::InvalidSafetensors {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            let tensors: HashMap<String, TensorInfo> = metadata
                .tensors()
                .into_iter()
                .map(|(k, v)| (k, v.clone()))
                .collect();
            for name in tensors.keys() {
                index.insert(name.clone(), mapped.len());
            }
            mapped.push(MappedFile {
                path,
                mmap,
                data_start: 8 + header,
                tensors,
            });
        }
        Ok(Self {
            files: mapped,
            index,
            config,
            device: device.clone(),
        })
    }

    fn lookup(&self, name: &str) -> Result<(&MappedFile, &TensorInfo)> {
        let file = self
            .index
            .get(name)
            .map(|&i| &self.files[i])
            .ok_or_else(|| EngineError::MissingTensor(name.to_string()))?;
        Ok((file, &file.tensors[name]))
    }

    fn raw(&self, name: &str) -> Result<(&[u8], &TensorInfo, DType)> {
        let (file, info) = self.lookup(name)?;
        let dtype = candle_dtype(info.dtype).ok_or_else(|| EngineError::InvalidSafetensors {
            path: file.path.clone(),
            reason: format!("tensor '{name}' has unsupported dtype {:?}", info.dtype),
        })?;
        let (s, e) = info.data_offsets;
        Ok((
            &file.mmap[file.data_start + s..file.data_start + e],
            info,
            dtype,
        ))
    }
}

/// The safetensors files of a directory: those named by the index, or every `*.safetensors`.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.is_file() {
        let text =
            std::fs::read_to_string(&index_path).map_err(|e| EngineError::io(&index_path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| EngineError::InvalidSafetensors {
                path: index_path.clone(),
                reason: e.to_string(),
            })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| EngineError::InvalidSafetensors {
                path: index_path.clone(),
                reason: "no weight_map object".into(),
            })?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        for f in &files {
            if !f.is_file() {
                return Err(EngineError::InvalidSafetensors {
                    path: index_path.clone(),
                    reason: format!("index names {} which does not exist", f.display()),
                });
            }
        }
        return Ok(files);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| EngineError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

fn candle_dtype(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        _ => return None,
    })
}

impl WeightSource for SafetensorsSource {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.lookup(name)?.1.shape.clone())
    }

    fn matrix(&self, name: &str, slice: &Slice, format: WeightFormat) -> Result<MatrixWeight> {
        let (data, info, dtype) = self.raw(name)?;
        let [rows, cols] = info.shape[..] else {
            return Err(EngineError::ShapeMismatch {
                name: name.into(),
                expected: vec![0, 0],
                actual: info.shape.clone(),
            });
        };
        let layout = MatrixLayout {
            rows,
            cols,
            unit_elems: 1,
            unit_bytes: dtype.size_in_bytes(),
        };
        let tensor = match slice {
            Slice::All => Tensor::from_raw_buffer(data, dtype, &[rows, cols], &self.device)?,
            Slice::Rows(r) => {
                if r.end > rows {
                    return Err(EngineError::Parallel(format!(
                        "rows {r:?} out of {rows} in {name}"
                    )));
                }
                Tensor::from_raw_buffer(
                    layout.rows(data, r),
                    dtype,
                    &[r.len(), cols],
                    &self.device,
                )?
            }
            Slice::Cols(c) => {
                if c.end > cols {
                    return Err(EngineError::Parallel(format!(
                        "columns {c:?} out of {cols} in {name}"
                    )));
                }
                Tensor::from_raw_buffer(
                    &layout.cols(data, c),
                    dtype,
                    &[rows, c.len()],
                    &self.device,
                )?
            }
        };
        Ok(MatrixWeight::Dense(
            tensor.to_dtype(format.activation_dtype())?,
        ))
    }

    fn vector(&self, name: &str) -> Result<Tensor> {
        let (data, info, dtype) = self.raw(name)?;
        Ok(
            Tensor::from_raw_buffer(data, dtype, &info.shape, &self.device)?
                .to_dtype(DType::F32)?,
        )
    }

    fn device(&self) -> &Device {
        &self.device
    }
}
