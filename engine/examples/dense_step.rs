//! A dense decode step's matmuls, as SmolLM2-135M has them dequantized: 30 layers of q/k/v
//! (960 x 576), o (576 x 576), gate/up (3072 x 576) and down (576 x 1536), then the LM head
//! (49152 x 576), in f32 or bf16, for `ROWS` activation rows (default 1), inside a rayon pool
//! as the engine runs them. Prints the weights' read rate per step and its fraction of the
//! read bandwidth (`liftoff bench limits`' loop) measured just before.
//!
//! `--hot` reuses layer 0's matrices and a small LM head (8192 rows), so that the weights stay
//! in cache and the step measures the kernel's arithmetic and per-call costs instead.
//!
//! `cargo run --release -p liftoff-engine --example dense_step [f32|bf16] [ROWS] [STEPS] [--hot]`

use candle_core::{DType, Device, Tensor};
use liftoff_engine::dense::PackedDense;
use liftoff_engine::quant::limits::read_bandwidth;
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dtype = match args.first().map(String::as_str) {
        Some("f32") => DType::F32,
        _ => DType::BF16,
    };
    let rows: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let steps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20);
    let hot = args.iter().any(|a| a == "--hot");
    let cpu = Device::Cpu;
    let matrix = |n: usize, k: usize, seed: usize| -> candle_core::Result<Tensor> {
        let v: Vec<f32> = (0..n * k)
            .map(|i| (((i + seed) * 7919) % 1000) as f32 / 5e4 - 0.01)
            .collect();
        Tensor::from_vec(v, (n, k), &cpu)?.to_dtype(dtype)
    };
    let mut mats: Vec<Tensor> = Vec::new();
    for l in 0..30 {
        for (i, (n, k)) in [(960, 576), (576, 576), (3072, 576), (576, 1536)]
            .into_iter()
            .enumerate()
        {
            let m = if hot && l > 0 {
                mats[i].clone()
            } else {
                matrix(n, k, l)?
            };
            mats.push(m);
        }
    }
    mats.push(matrix(if hot { 8192 } else { 49152 }, 576, 0)?);
    let bytes: usize = mats
        .iter()
        .map(|m| m.elem_count() * dtype.size_in_bytes())
        .sum();
    let x = |k: usize| {
        Tensor::from_vec(
            (0..rows * k)
                .map(|i| ((i * 31) % 97) as f32 / 97.0)
                .collect::<Vec<_>>(),
            (rows, k),
            &cpu,
        )
    };
    let (x576, x1536) = (x(576)?, x(1536)?);
    let packed: Vec<PackedDense> = mats
        .iter()
        .map(|m| Ok(PackedDense::new(m)?.expect("an f32/bf16 CPU matrix")))
        .collect::<liftoff_engine::error::Result<_>>()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let pool = rayon::ThreadPoolBuilder::new()
        .build()
        .expect("a rayon pool");
    let mut times = Vec::new();
    let bandwidth = pool.install(|| read_bandwidth(256 << 20, 3));
    pool.install(|| -> candle_core::Result<()> {
        for _ in 0..steps {
            let t = Instant::now();
            for m in &packed {
                let xs = if m.dims().1 == 576 { &x576 } else { &x1536 };
                m.matmul_t(xs)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            }
            times.push(t.elapsed().as_secs_f64());
        }
        Ok(())
    })?;
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    println!(
        "{dtype:?} rows={rows}: {:.2} ms per step (median of {steps}), {:.1} GB/s of weights \
         ({} MB), {:.0} % of the read bandwidth measured before ({:.1} GB/s)",
        med * 1e3,
        bytes as f64 / med / 1e9,
        bytes / 1_000_000,
        100.0 * bytes as f64 / med / bandwidth,
        bandwidth / 1e9
    );
    Ok(())
}
