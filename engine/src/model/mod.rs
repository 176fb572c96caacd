//! Model definitions.

mod cpu_ops;
pub mod llama;
pub mod rope;

pub use llama::Llama;
