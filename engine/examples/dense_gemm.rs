//! A dense matmul at prefill or batched-decode sizes: candle's GEMM on the row-major matrix
//! against liftoff's packed kernel (`liftoff_engine::dense`), alternated in one process, each
//! timed over `REPS` calls, in GFLOP/s. The weights are a deterministic pattern; their values
//! do not change the speed.
//!
//! `cargo run --release -p liftoff-engine --example dense_gemm [f32|bf16] M N K [REPS]`
//! (for SmolLM2's gate/up at a 512-token prompt: `f32 512 3072 576`).

use candle_core::{DType, Device, Tensor};
use liftoff_engine::dense::PackedDense;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "dense_gemm [f32|bf16] M N K [REPS]";
    let dtype = match args.first().map(String::as_str) {
        Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        _ => return Err(usage.into()),
    };
    let dim = |i: usize| -> Result<usize, Box<dyn std::error::Error>> {
        Ok(args.get(i).ok_or(usage)?.parse()?)
    };
    let (m, n, k) = (dim(1)?, dim(2)?, dim(3)?);
    let reps = dim(4).unwrap_or(8).max(1);
    let values = |len: usize, mul: usize, div: f32| -> Vec<f32> {
        (0..len).map(|i| ((i * mul) % 1000) as f32 / div).collect()
    };
    let w = Tensor::from_vec(values(n * k, 7919, 5e4), (n, k), &Device::Cpu)?.to_dtype(dtype)?;
    let x = Tensor::from_vec(values(m * k, 31, 1e3), (m, k), &Device::Cpu)?.to_dtype(dtype)?;
    let packed = PackedDense::new(&w)?.ok_or("not an f32/bf16 CPU matrix")?;
    let wt = w.t()?;
    let (mut candle, mut ours) = (0.0, 0.0);
    for _ in 0..reps {
        let t = Instant::now();
        x.matmul(&wt)?;
        candle += t.elapsed().as_secs_f64();
        let t = Instant::now();
        packed.matmul_t(&x)?;
        ours += t.elapsed().as_secs_f64();
    }
    let flops = 2.0 * (m * n * k) as f64 * reps as f64;
    println!(
        "{dtype:?} {m}x{n}x{k}: candle {:.1} GFLOP/s, packed {:.1} GFLOP/s ({:.2}x)",
        flops / candle / 1e9,
        flops / ours / 1e9,
        candle / ours
    );
    Ok(())
}
