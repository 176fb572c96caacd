//! Decode attention as a served step sees it: 12 sequences of 80-135 positions (SmolLM2's 9
//! query and 3 KV heads of 64), f16 caches, one cache per layer for `LAYERS` layers (default
//! 30) read in turn, so that each layer's keys and values are cold when its turn comes.
//!
//! `cargo run --release -p liftoff-kernels --example decode_attention [LAYERS] [CONTEXTS]`;
//! 1 layer gives the hot-cache figure; `CONTEXTS` (comma-separated) replaces the 12 sequences,
//! `576` is a single stream after a 512-token prompt. It calls from inside a rayon pool, as
//! the engine does (figures before 2026-12-03 were measured from outside one). Environment:
//! `EVICT=MB` reads that many MB of other memory before each layer's call (untimed), as a
//! decode step's weights do between two layers' attention (SmolLM2 Q4_1: about 3); `SPREAD`
//! (default 40) places each sequence's blocks that many blocks apart; `ROUNDS` (default 5).

use candle_core::{Device, Tensor};
use half::f16;
use liftoff_kernels::check::{random_case, AttentionCase};
use liftoff_kernels::{paged_attention, PagedLayout, SeqSpan};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let layers: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let (heads, kv_heads, d, bs) = (9, 3, 64, 16);
    let contexts: Vec<usize> = match std::env::args().nth(2) {
        Some(list) => list
            .split(',')
            .map(|c| c.trim().parse().expect("a context length"))
            .collect(),
        None => (0..12).map(|i| 80 + i * 5).collect(),
    };
    let case = AttentionCase::decode(&contexts, heads, kv_heads, d, bs);
    let data = random_case(&case, 5);
    // Each sequence's blocks spread over a pool 40 times larger, as in a served cache.
    let spread: usize = std::env::var("SPREAD")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let blocks = data.num_blocks * spread;
    let tables: Vec<Vec<u32>> = data
        .tables
        .iter()
        .map(|t| t.iter().map(|&b| b * spread as u32).collect())
        .collect();
    let spans: Vec<SeqSpan> = tables
        .iter()
        .zip(&contexts)
        .enumerate()
        .map(|(i, (t, &c))| SeqSpan {
            query_start: i,
            query_len: 1,
            context_len: c,
            block_table: t,
        })
        .collect();
    let layout = PagedLayout::new(&spans, bs, &Device::Cpu)?;
    let mut seed = 1u64;
    let mut cache = || {
        let n = blocks * bs * kv_heads * d;
        let v: Vec<f16> = (0..n)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                f16::from_f32((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            })
            .collect();
        Tensor::from_vec(v, (blocks, bs, kv_heads, d), &Device::Cpu)
    };
    let caches = (0..layers)
        .map(|_| Ok((cache()?, cache()?)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let q = Tensor::from_vec(data.q.clone(), (contexts.len(), heads, d), &Device::Cpu)?;
    // The engine calls from inside its compute pool; so does this.
    let pool = rayon::ThreadPoolBuilder::new()
        .build()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    pool.install(|| rounds(&q, &caches, &layout, case.shape, layers))
}

/// Rounds of 20 passes over the layers' caches, the attention calls timed.
fn rounds(
    q: &Tensor,
    caches: &[(Tensor, Tensor)],
    layout: &PagedLayout,
    shape: liftoff_kernels::AttentionShape,
    layers: usize,
) -> candle_core::Result<()> {
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let (rounds, evict_mb) = (env("ROUNDS", 5), env("EVICT", 0));
    let other: Vec<u64> = (0..(evict_mb << 20) / 8 * layers)
        .map(|i| i as u64)
        .collect();
    let per = other.len() / layers.max(1);
    for round in 0..rounds {
        let (mut spent, mut sink) = (std::time::Duration::ZERO, 0u64);
        for _ in 0..20 {
            for (l, (k, v)) in caches.iter().enumerate() {
                sink = other[l * per..(l + 1) * per]
                    .iter()
                    .fold(sink, |a, &b| a.wrapping_add(b));
                let t = Instant::now();
                std::hint::black_box(paged_attention(q, k, v, layout, shape)?);
                spent += t.elapsed();
            }
        }
        std::hint::black_box(sink);
        let us = spent.as_secs_f64() / (20 * layers) as f64 * 1e6;
        println!("round {round}: {us:.1} us per layer's call ({layers} layers)");
    }
    Ok(())
}
