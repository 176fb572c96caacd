//! Model definitions.

mod cpu_ops;
pub mod llama;
pub mod rope;
mod warm_threads;

pub use llama::Llama;
