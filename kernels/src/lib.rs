//! The kernels candle lacks for serving: attention over a paged KV cache (decode, split-K
//! decode for long contexts, and tiled prefill that never materialises a score matrix), the
//! KV-cache write by slot mapping, in-place rotary embedding, and sampling (logits rows to
//! token ids on the device).
//!
//! Each is a candle custom op: on CUDA tensors it launches the kernel from `cuda/*.cu`
//! (feature `cuda`, PTX for sm_80 and sm_90), on CPU tensors it runs a Rust implementation.
//! [`reference`] holds plain implementations of the same algorithms (split-K merge, online
//! softmax over key tiles) that the tests compare against, and [`check`] compares any device's
//! ops with them (`liftoff kernel-check` runs it on a GPU).

mod attention;
mod attention_cpu;
mod cache;
pub mod check;
#[cfg(feature = "cuda")]
mod cuda;
mod disjoint;
pub mod elementwise;
mod layout;
pub mod reference;
mod rotary;
pub mod sampling;
pub mod shares;
mod storage;

pub use attention::{paged_attention, AttentionShape};
pub use cache::write_kv;
pub use disjoint::DisjointOut;
pub use layout::{HostLayout, PagedLayout, SeqSpan};
pub use rotary::{rotary_embedding, RotaryTables};
pub use sampling::{sample, RowSampling, SampledToken};
pub use storage::with_cpu_f32;

/// Keys per partition of the split-K decode kernel; a context longer than this is split.
pub const DECODE_PARTITION: usize = 512;
/// Queries per tile of the prefill kernel.
pub const PREFILL_TILE_Q: usize = 16;
/// Keys per shared-memory chunk of the prefill kernel.
pub const PREFILL_TILE_K: usize = 16;
/// Largest head dimension the CUDA kernels take.
pub const MAX_HEAD_DIM: usize = 256;
