//! Readers at run time: checks `POST /reader` bodies (Takeoff's reader configuration) and the
//! readers given at start, turning each into a [`ReaderSpec`]; loads them with
//! [`reader::start`]; and says how much memory the readers of a device may use together.

use crate::model_resolve;
use crate::plan::DeviceKind;
use crate::reader::{self, Reader};
use crate::serve::ServeArgs;
use crate::serve_config;
use liftoff_engine::load::open_model;
use liftoff_engine::loader::ModelPath;
use liftoff_engine::model::Llama;
use liftoff_engine::DTypeChoice;
use liftoff_server::error::ApiError;
use liftoff_server::{LoadedReader, ReaderLoader, ReaderSpec};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// KV-cache memory per rank of a reader that shares a GPU, unless its `page_cache_size` says.
pub const SHARED_GPU_KV_MIB: usize = 2048;

/// KV-cache memory per rank on the CPU unless configured (as `reader::kv_budget`).
const CPU_KV_MIB: u64 = 512;

/// Takeoff reader keys that have no effect in liftoff, accepted so that Takeoff's clients
/// and manifests work: there is no Redis (requests go to the reader in-process), no CUDA
/// graphs or static KV cache to turn off, NCCL picks its own transport, and the server's
/// `--log-level` applies to every reader.
const INERT_KEYS: &[&str] = &[
    "redis_host",
    "log_level",
    "nvlink_unavailable",
    "disable_cuda_graph",
    "cuda_graph_cache_capacity",
    "disable_static",
];

/// Settings of the whole server, which a reader configuration cannot set.
const SERVER_KEYS: &[&str] = &[
    "host",
    "port",
    "management_port",
    "management_host",
    "api_key",
    "management_api_key",
    "body_size_limit_bytes",
    "config_file",
    "models_memory_mib",
    "model_root",
    "reader_load_timeout_secs",
    "drain_timeout_secs",
];

/// Loads readers for the registry.
pub struct Loader {
    log_level: String,
    /// Directories `POST /reader` may load from (canonical).
    roots: Vec<PathBuf>,
    budget_mib: Option<u64>,
    fraction: f32,
    gpu_total: OnceLock<Option<u64>>,
}

impl Loader {
    /// A loader with the server settings of `first`; the default roots are the model cache
    /// and the directories of the `readers` given at start.
    pub fn new(first: &ServeArgs, readers: &[ServeArgs], log_level: &str) -> anyhow::Result<Self> {
        let mut roots = Vec::new();
        if first.model_root.is_empty() {
            // The model cache may not exist yet.
            let cache = liftoff_engine::cache_dir::model_cache_dir();
            roots.push(cache.canonicalize().unwrap_or(cache));
            for r in readers {
                let p = Path::new(&r.model);
                if p.exists() {
                    roots.extend(p.canonicalize()?.parent().map(Path::to_path_buf));
                }
            }
        } else {
            for r in &first.model_root {
                let c = r
                    .canonicalize()
                    .map_err(|e| anyhow::anyhow!("--model-root {}: {e}", r.display()))?;
                roots.push(c);
            }
        }
        Ok(Self {
            log_level: log_level.to_string(),
            roots,
            budget_mib: first.models_memory_mib,
            fraction: first.gpu_memory_utilization,
            gpu_total: OnceLock::new(),
        })
    }

    /// Checks a reader's settings (no weights read) and describes it for the registry.
    /// `from_api`: it came from `POST /reader`, so its model must lie under a root, and its
    /// KV cache is sized from `page_cache_size` or a stated default even on a GPU. `shared`:
    /// other readers may share its device.
    pub fn spec(
        &self,
        mut args: ServeArgs,
        from_api: bool,
        shared: bool,
    ) -> Result<ReaderSpec, ApiError> {
        let bad = |field: &str, e: &dyn std::fmt::Display| ApiError::invalid(field, e.to_string());
        for (field, v) in [
            ("max_batch_size", args.max_batch_size),
            ("block_size", args.block_size),
            ("max_num_batched_tokens", args.max_num_batched_tokens),
            ("tensor_parallel", args.tensor_parallel),
        ] {
            if v == 0 {
                return Err(ApiError::invalid(
                    field,
                    format!("{field} must be at least 1"),
                ));
            }
        }
        reader::parse_max_step(&args.max_step_ms).map_err(|e| bad("max_step_ms", &e))?;
        reader::step_timeout(args.step_timeout_secs).map_err(|e| bad("step_timeout_secs", &e))?;
        let fraction = args.gpu_memory_utilization;
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(ApiError::invalid(
                "gpu_memory_utilization",
                format!("gpu_memory_utilization must be in (0, 1], got {fraction}"),
            ));
        }
        let dtype: DTypeChoice = args.dtype.parse().map_err(|e| bad("dtype", &e))?;
        let kind = DeviceKind::resolve(&args.device).map_err(|e| bad("device", &e))?;
        if kind == DeviceKind::Cuda && shared && args.kv_cache_memory_mib.is_none() {
            args.kv_cache_memory_mib = Some(SHARED_GPU_KV_MIB);
        }
        let path = Path::new(&args.model);
        let weights = if path.exists() {
            if from_api && !self.allowed(path) {
                return Err(ApiError::forbidden(
                    "model_name",
                    format!(
                        "{} is outside the directories readers may load from ({}); start the server with --model-root to allow it",
                        path.display(),
                        self.roots
                            .iter()
                            .map(|r| r.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            let mp = ModelPath::resolve(path).map_err(|e| bad("model_name", &e))?;
            let (source, _) =
                open_model(&mp, &candle_core::Device::Cpu).map_err(|e| bad("model_name", &e))?;
            Llama::check_tensor_parallel(source.config(), args.tensor_parallel)
                .map_err(|e| bad("tensor_parallel", &e))?;
            estimate_weights(&mp, dtype, kind)
        } else if model_resolve::is_default(&args.model) {
            // About the default model's Q4_1 file.
            100 << 20
        } else if model_resolve::is_hub_id(&args.model) {
            // Known once fetched; the first load measures it.
            0
        } else {
            return Err(ApiError::invalid(
                "model_name",
                format!(
                    "model not found: {} (give a .gguf file, a Hugging Face model directory, a Hub id like org/name, or '{}')",
                    args.model,
                    model_resolve::DEFAULT_MODEL
                ),
            ));
        };
        let ranks = args.tensor_parallel * args.replicas.unwrap_or(1);
        let kv = match (args.kv_cache_memory_mib, kind) {
            (Some(mib), _) => (mib as u64) << 20,
            (None, DeviceKind::Cpu) => CPU_KV_MIB << 20,
            // All the GPU memory the fraction leaves: known once loaded.
            (None, DeviceKind::Cuda) => 0,
        };
        let device = match kind {
            DeviceKind::Cpu => "cpu".to_string(),
            DeviceKind::Cuda => format!(
                "cuda:{}",
                args.cuda_visible_devices
                    .clone()
                    .or_else(|| std::env::var("CUDA_VISIBLE_DEVICES").ok())
                    .unwrap_or_else(|| "all".into())
            ),
        };
        Ok(ReaderSpec {
            reader_id: args.reader_id.clone(),
            model_name: reader::model_name(&args.model, path),
            consumer_group: args.consumer_group.clone(),
            device,
            pinned: args.pinned,
            estimate_bytes: weights + kv * ranks as u64,
            config: config_json(&args),
            args: Arc::new(args),
        })
    }

    fn allowed(&self, path: &Path) -> bool {
        path.canonicalize()
            .is_ok_and(|p| self.roots.iter().any(|r| p.starts_with(r)))
    }

    /// The total memory of the GPUs (read once, through a CUDA context of this process).
    fn gpu_total(&self) -> Option<u64> {
        *self.gpu_total.get_or_init(|| {
            #[cfg(feature = "cuda")]
            {
                let dev = candle_core::Device::new_cuda(0).ok()?;
                liftoff_engine::worker::device_memory(&dev)
                    .ok()
                    .map(|(_, total)| total)
            }
            #[cfg(not(feature = "cuda"))]
            None
        })
    }
}

impl ReaderLoader for Loader {
    fn prepare(&self, body: &Map<String, Value>) -> Result<ReaderSpec, ApiError> {
        let pairs = takeoff_pairs(body)?;
        // Each setting on its own first, so that an error names its field.
        for (id, value) in &pairs {
            serve_config::reader_from_pairs(std::slice::from_ref(&(id.clone(), value.clone())))
                .map_err(|e| {
                    let field = if id == "model" {
                        "model_name"
                    } else {
                        id.as_str()
                    };
                    ApiError::invalid(field, format!("{field}: {}", first_line(&e.to_string())))
                })?;
        }
        let args = serve_config::reader_from_pairs(&pairs)
            .map_err(|e| ApiError::invalid("reader", first_line(&e.to_string())))?;
        self.spec(args, true, true)
    }

    fn load(&self, spec: &ReaderSpec) -> Result<LoadedReader, String> {
        let args = spec
            .args
            .downcast_ref::<ServeArgs>()
            .ok_or_else(|| "a reader of another loader".to_string())?;
        let Reader {
            service,
            supervisor,
            memory_bytes,
        } = reader::start(args, &self.log_level).map_err(|e| format!("{e:#}"))?;
        Ok(LoadedReader {
            service,
            memory_bytes,
            stop: Box::new(move || {
                if let Some(s) = supervisor {
                    s.shutdown(Duration::from_secs(10));
                }
            }),
        })
    }

    fn released(&self) {
        // The allocator keeps freed weights in its arenas; trimming returns them to the
        // system, so that the next reader's memory is really there.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim has no preconditions.
        unsafe {
            nix::libc::malloc_trim(0);
        }
    }

    fn budget(&self, device: &str) -> Option<u64> {
        // Per device: a set of GPUs gets one device's budget per GPU (a reader's footprint
        // counts every rank).
        let devices = match device.strip_prefix("cuda:") {
            Some("all") => crate::plan::gpu_count().max(1),
            Some(list) => list
                .split(',')
                .filter(|d| !d.trim().is_empty())
                .count()
                .max(1),
            None => 1,
        } as u64;
        if let Some(mib) = self.budget_mib {
            return Some((mib << 20) * devices);
        }
        let total = if device == "cpu" {
            host_memory()
        } else {
            self.gpu_total()
        }?;
        Some((total as f64 * self.fraction as f64) as u64 * devices)
    }
}

/// A `POST /reader` body as `(setting id, value)` pairs, Takeoff's key names mapped to
/// liftoff's (`model_name` is `model`, `page_cache_size` is `kv_cache_memory_mib`).
fn takeoff_pairs(body: &Map<String, Value>) -> Result<Vec<(String, String)>, ApiError> {
    if !body.contains_key("model_name") {
        return Err(ApiError::invalid("model_name", "model_name is required"));
    }
    let known = serve_config::setting_ids();
    let mut pairs = Vec::new();
    for (key, value) in body {
        if value.is_null() || INERT_KEYS.contains(&key.as_str()) {
            continue;
        }
        let text = scalar(key, value)?;
        let (id, text) = match key.as_str() {
            "model_name" => ("model".to_string(), text),
            "page_cache_size" => ("kv_cache_memory_mib".to_string(), mib(&text)?),
            "quant_type" | "backend" => {
                return Err(ApiError::invalid(
                    key,
                    format!("{key} is not supported: liftoff keeps GGUF weights as quantized and loads Hugging Face checkpoints with --dtype"),
                ))
            }
            "disable_paged_attention" if truthy(&text) => {
                return Err(ApiError::invalid(
                    key,
                    "liftoff always uses paged attention; disable_paged_attention cannot be set",
                ))
            }
            "disable_paged_attention" => continue,
            k if SERVER_KEYS.contains(&k) => {
                return Err(ApiError::invalid(
                    key,
                    format!("{key} is a server setting, not a reader's"),
                ))
            }
            k if known.iter().any(|id| id == k) => (k.to_string(), text),
            _ => return Err(ApiError::invalid(key, format!("unknown reader setting '{key}'"))),
        };
        pairs.push((id, text));
    }
    Ok(pairs)
}

fn scalar(key: &str, v: &Value) -> Result<String, ApiError> {
    Ok(match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Array(items) => items
            .iter()
            .map(|i| scalar(key, i))
            .collect::<Result<Vec<_>, _>>()?
            .join(","),
        _ => {
            return Err(ApiError::invalid(
                key,
                format!("{key}: expected a string, number, boolean or list"),
            ))
        }
    })
}

fn truthy(v: &str) -> bool {
    matches!(v.trim(), "true" | "1")
}

/// Takeoff's `page_cache_size` in MiB: a number of MiB, or a size with a unit (`512MB`,
/// `2GiB`, `1 GB`).
fn mib(v: &str) -> Result<String, ApiError> {
    let s = v.trim().to_ascii_lowercase();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad_size(v))?;
    let factor = match unit.trim() {
        "" | "mb" | "mib" | "m" => 1.0,
        "gb" | "gib" | "g" => 1024.0,
        "kb" | "kib" | "k" => 1.0 / 1024.0,
        _ => return Err(bad_size(v)),
    };
    let mib = (n * factor).round();
    if mib.is_nan() || mib < 1.0 {
        return Err(bad_size(v));
    }
    Ok((mib as u64).to_string())
}

fn bad_size(v: &str) -> ApiError {
    ApiError::invalid(
        "page_cache_size",
        format!("page_cache_size: '{v}' is not a size (MiB, or a number with MB or GB)"),
    )
}

fn first_line(s: &str) -> String {
    s.lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_string()
}

/// What the weights of `path` take once loaded: the GGUF file (kept quantized), or the
/// safetensors scaled from the checkpoint's dtype to the one they load in.
fn estimate_weights(path: &ModelPath, dtype: DTypeChoice, kind: DeviceKind) -> u64 {
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    match path {
        ModelPath::Gguf(f) => size(f),
        ModelPath::HfDir(dir) => {
            let files: u64 = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .map(|p| size(&p))
                .sum();
            let stored = std::fs::read_to_string(dir.join("config.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .and_then(|c| c["torch_dtype"].as_str().map(dtype_bytes))
                .unwrap_or(4);
            let loaded = match dtype {
                DTypeChoice::Auto if kind == DeviceKind::Cpu => 4,
                DTypeChoice::F32 => 4,
                DTypeChoice::Auto | DTypeChoice::Bf16 | DTypeChoice::F16 => 2,
            };
            files * loaded / stored
        }
    }
}

fn dtype_bytes(name: &str) -> u64 {
    match name {
        "float32" | "f32" => 4,
        "float16" | "bfloat16" | "f16" | "bf16" => 2,
        _ => 4,
    }
}

/// Total host memory (`/proc/meminfo`).
fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// A reader's effective configuration: its settings, Takeoff's names for two of them, no
/// secrets and no server settings.
fn config_json(args: &ServeArgs) -> Value {
    let mut v = serde_json::to_value(args).unwrap_or_default();
    if let Value::Object(m) = &mut v {
        for k in SERVER_KEYS {
            m.remove(*k);
        }
        if let Some(model) = m.remove("model") {
            m.insert("model_name".into(), model);
        }
        if let Some(kv) = m.get("kv_cache_memory_mib").cloned() {
            m.insert("page_cache_size".into(), kv);
        }
        m.insert(
            "access_token".into(),
            Value::Bool(args.access_token.is_some()),
        );
        // As written (0.9), not as the f32 widens (0.899999976...).
        let fraction: f64 = args
            .gpu_memory_utilization
            .to_string()
            .parse()
            .unwrap_or_default();
        m.insert("gpu_memory_utilization".into(), fraction.into());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn takeoff_keys_map_to_settings() {
        let pairs = takeoff_pairs(&body(json!({
            "model_name": "m", "device": "cpu", "consumer_group": "g", "page_cache_size": "1GB",
            "max_batch_size": 4, "redis_host": "localhost", "log_level": "INFO", "cuda_visible_devices": [0, 1],
            "max_sequence_length": null
        })))
        .unwrap();
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(id, _)| id == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("model"), Some("m"));
        assert_eq!(get("kv_cache_memory_mib"), Some("1024"));
        assert_eq!(get("max_batch_size"), Some("4"));
        assert_eq!(get("cuda_visible_devices"), Some("0,1"));
        assert_eq!(get("redis_host"), None);
        assert_eq!(get("max_sequence_length"), None);
    }

    #[test]
    fn bad_keys_are_400s_naming_the_field() {
        for (b, field) in [
            (json!({"device": "cpu"}), "model_name"),
            (json!({"model_name": "m", "port": 1}), "port"),
            (json!({"model_name": "m", "colour": "red"}), "colour"),
            (
                json!({"model_name": "m", "quant_type": "awq"}),
                "quant_type",
            ),
            (
                json!({"model_name": "m", "disable_paged_attention": 1}),
                "disable_paged_attention",
            ),
            (
                json!({"model_name": "m", "page_cache_size": "lots"}),
                "page_cache_size",
            ),
            (json!({"model_name": {"a": 1}}), "model_name"),
        ] {
            let e = takeoff_pairs(&body(b.clone())).unwrap_err();
            assert_eq!(e.status, 400, "{b}");
            assert_eq!(e.param.as_deref(), Some(field), "{b}: {}", e.message);
        }
    }

    #[test]
    fn page_cache_sizes() {
        for (v, want) in [
            ("64", "64"),
            ("512MB", "512"),
            ("2GiB", "2048"),
            ("1.5 GB", "1536"),
        ] {
            assert_eq!(mib(v).unwrap(), want, "{v}");
        }
        for v in ["", "0", "-1", "10%", "many"] {
            assert!(mib(v).is_err(), "{v}");
        }
    }
}
