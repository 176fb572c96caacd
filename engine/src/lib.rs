//! liftoff's engine: Llama-family models with sharded weights, a paged KV cache, and sampling.

pub mod batch;
pub mod cache_dir;
pub mod config;
pub mod constraint;
pub mod dense;
pub mod error;
pub mod kv_budget;
pub mod kv_cache;
pub mod load;
pub mod loader;
pub mod model;
pub mod model_runner;
pub mod oneshot;
pub mod parallel;
pub mod prefetch;
pub mod profile;
pub mod quant;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
pub mod stop;
pub mod tokenizer;
pub mod worker;

pub use error::{EngineError, Result};

pub use kv_budget::KvBudget;
pub use load::{DTypeChoice, EngineOptions, LoadedModel};
pub use oneshot::{Engine, Generation};
