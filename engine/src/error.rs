//! Engine errors. Every message names the offending file, tensor or field in one line.

use std::path::PathBuf;

/// Errors raised while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model not found: {0} (expected a .gguf file or a Hugging Face model directory)")]
    ModelNotFound(PathBuf),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid GGUF file {path}: {reason}")]
    InvalidGguf { path: PathBuf, reason: String },
    #[error("invalid safetensors file {path}: {reason}")]
    InvalidSafetensors { path: PathBuf, reason: String },
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    #[error("unsupported model architecture '{0}' (supported: llama, mistral and Llama-family checkpoints)")]
    UnsupportedArchitecture(String),
    #[error("missing tensor '{0}' in the model weights")]
    MissingTensor(String),
    #[error("tensor '{name}' has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("invalid request: {0}")]
    InvalidParam(#[from] crate::sampling::ParamError),
    /// A request the scheduler refused or could not finish (its message says why).
    #[error("{0}")]
    Generation(String),
    #[error("KV cache exhausted: {0}")]
    KvCacheExhausted(String),
    #[error("tensor-parallel: {0}")]
    Parallel(String),
    /// A collective between the ranks of a group failed; the group cannot go on.
    #[error("communicator: {0}")]
    Comm(String),
    /// A worker process of the replica group is gone or broke its protocol; the group is down.
    #[error("worker lost: {0}")]
    WorkerLost(String),
    #[error("{}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
}

/// Result alias for the engine.
pub type Result<T> = std::result::Result<T, EngineError>;

impl EngineError {
    /// Whether the replica group that raised this can serve nothing more.
    pub fn is_fatal(&self) -> bool {
        matches!(self, EngineError::Comm(_) | EngineError::WorkerLost(_))
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.into(),
            source,
        }
    }
}

/// candle's message without the backtrace it appends when `RUST_BACKTRACE` is set.
pub fn candle_message(e: &candle_core::Error) -> String {
    let text = e.to_string();
    text.lines().next().unwrap_or_default().trim().to_string()
}
