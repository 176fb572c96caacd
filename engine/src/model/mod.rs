//! Model definitions.

mod cpu_ops;
pub mod llama;
pub mod rope;
pub mod warm_threads;

pub use llama::Llama;
