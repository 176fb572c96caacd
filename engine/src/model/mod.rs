//! Model definitions.

pub mod llama;
pub mod rope;

pub use llama::Llama;
