//! A dense decode step's matmuls, as SmolLM2-135M has them dequantized: 30 layers of q/k/v
//! (960 x 576), o (576 x 576), gate/up (3072 x 576) and down (576 x 1536), then the LM head
//! (49152 x 576), in f32 or bf16, for `ROWS` activation rows (default 1), inside a rayon pool
//! with its threads kept awake as the engine runs them. Three rounds, each printing the
//! weights' read rate per step and its fraction of the mean read bandwidth
//! (`liftoff bench bandwidth`' loop) over 1 s before and 1 s after it.
//!
//! `--hot` reuses layer 0's packed matrices and a small LM head (8192 rows), so that the
//! weights (16.5 MB of bf16, 33 MB of f32 with the head) come mostly from L3 and the step measures the kernel's arithmetic and per-call
//! costs instead.
//!
//! `cargo run --release -p liftoff-engine --example dense_step [f32|bf16] [ROWS] [STEPS] [--hot] [--prefetch-ab]`

use candle_core::{DType, Device, Tensor};
use liftoff_engine::dense::PackedDense;
use liftoff_engine::quant::limits::read_bandwidth_series;
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dtype = match args.first().map(String::as_str) {
        Some("f32") => DType::F32,
        _ => DType::BF16,
    };
    let rows: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let steps: usize = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
        .max(1);
    let hot = args.iter().any(|a| a == "--hot");
    // `--prefetch-ab`: single-row software prefetch on and off on alternate steps.
    let prefetch_ab = args.iter().any(|a| a == "--prefetch-ab");
    let cpu = Device::Cpu;
    let matrix = |n: usize, k: usize, seed: usize| -> candle_core::Result<Tensor> {
        let v: Vec<f32> = (0..n * k)
            .map(|i| (((i + seed) * 7919) % 1000) as f32 / 5e4 - 0.01)
            .collect();
        Tensor::from_vec(v, (n, k), &cpu)?.to_dtype(dtype)
    };
    // The step's matmuls in order, as indices into `mats` (`--hot` repeats layer 0's).
    let (mut mats, mut order): (Vec<Tensor>, Vec<usize>) = (Vec::new(), Vec::new());
    for l in 0..30 {
        for (i, (n, k)) in [(960, 576), (576, 576), (3072, 576), (576, 1536)]
            .into_iter()
            .enumerate()
        {
            if hot && l > 0 {
                order.push(i);
            } else {
                order.push(mats.len());
                mats.push(matrix(n, k, l)?);
            }
        }
    }
    order.push(mats.len());
    mats.push(matrix(if hot { 8192 } else { 49152 }, 576, 0)?);
    let bytes: usize = order
        .iter()
        .map(|&i| mats[i].elem_count() * dtype.size_in_bytes())
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
    for round in 0..3 {
        let before = pool
            .install(|| read_bandwidth_series(256 << 20, 1.0))
            .mean();
        let mut times = Vec::new();
        let mut ab = [Vec::new(), Vec::new()];
        liftoff_engine::model::warm_threads::install(&pool, || -> candle_core::Result<()> {
            for step in 0..steps {
                if prefetch_ab {
                    liftoff_engine::prefetch::set_single_row(step % 2 == 1);
                }
                let t = Instant::now();
                for m in order.iter().map(|&i| &packed[i]) {
                    let xs = if m.dims().1 == 576 { &x576 } else { &x1536 };
                    m.matmul_t(xs)
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                }
                let took = t.elapsed().as_secs_f64();
                times.push(took);
                ab[step % 2].push(took);
            }
            Ok(())
        })?;
        let after = pool
            .install(|| read_bandwidth_series(256 << 20, 1.0))
            .mean();
        let bandwidth = (before + after) / 2.0;
        let total: f64 = times.iter().sum();
        let mean = total / steps as f64;
        println!(
            "round {round}: {dtype:?} rows={rows}: {:.2} ms per step (mean of {steps}), {:.1} GB/s of weights \
             ({} MB), {:.0} % of the mean read bandwidth around it ({:.1} / {:.1} GB/s)",
            mean * 1e3,
            bytes as f64 / mean / 1e9,
            bytes / 1_000_000,
            100.0 * bytes as f64 / mean / bandwidth,
            before / 1e9,
            after / 1e9
        );
        if prefetch_ab {
            let ms = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64 * 1e3;
            println!(
                "round {round}: single-row prefetch on {:.2} ms, off {:.2} ms per step (alternate steps)",
                ms(&ab[1]),
                ms(&ab[0])
            );
        }
    }
    Ok(())
}
