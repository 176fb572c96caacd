//! A served decode step's quantized matmuls, as SmolLM2-135M's Q4_1 GGUF has them: 30 layers
//! of q/k/v (960 x 576), o (576 x 576), gate/up (3072 x 576) and down (576 x 1536), then the
//! Q8_0 LM head (49152 x 576), for `ROWS` activation rows (default 12), inside a rayon pool as
//! the engine runs them. The weights (96 MB) stream from memory as in serving; `--hot` reuses
//! layer 0's matrices so that they stay in cache.
//!
//! `cargo run --release -p liftoff-engine --example step_matmuls [avx2|avx512vnni|amx|scalar] [ROWS] [--hot] [--vs FAMILY | --prefetch-ab]`

use liftoff_engine::quant::{gemm::gemm, quantize_rows, Isa, PackedMatrix, WeightKind};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let isa = Isa::ALL
        .into_iter()
        .find(|i| args.first().is_some_and(|a| a == i.name()))
        .unwrap_or_else(Isa::detect);
    if !isa.available() {
        eprintln!("{} is not available on this CPU", isa.name());
        std::process::exit(2);
    }
    let rows: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(12);
    let hot = args.iter().any(|a| a == "--hot");
    let mut s = 0x9E3779B97F4A7C15u64;
    let mut byte = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as u8
    };
    let mut matrix = |kind: WeightKind, n: usize, k: usize| {
        let mut ggml = Vec::with_capacity(n * k / 32 * kind.ggml_block_bytes());
        for _ in 0..n * k / 32 {
            ggml.extend_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
            match kind {
                WeightKind::Q4_1 => {
                    ggml.extend_from_slice(&half::f16::from_f32(-0.05).to_le_bytes());
                    ggml.extend((0..16).map(|_| byte()));
                }
                WeightKind::Q8_0 => ggml.extend((0..32).map(|_| byte())),
            }
        }
        PackedMatrix::pack(kind, &ggml, n, k)
    };
    let mut layers = Vec::new();
    for _ in 0..30 {
        for (n, k) in [(960, 576), (576, 576), (3072, 576), (576, 1536)] {
            layers.push(matrix(WeightKind::Q4_1, n, k));
        }
    }
    let head = matrix(WeightKind::Q8_0, 49152, 576);
    let acts = |k: usize| {
        let xs: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        quantize_rows(&xs, k)
    };
    let (acts576, acts1536) = (acts(576), acts(1536));
    let pool = rayon::ThreadPoolBuilder::new()
        .build()
        .expect("a rayon pool");
    println!(
        "{} kernels, {rows} rows, {} threads, weights {}",
        isa.name(),
        pool.current_num_threads(),
        if hot { "in cache" } else { "from memory" }
    );
    // `--vs ISA`: alternate with a second family step by step in the same process, so that
    // both see the same machine (a shared host's speed moves within seconds).
    let other = args
        .iter()
        .position(|a| a == "--vs")
        .and_then(|i| args.get(i + 1))
        .and_then(|name| Isa::ALL.into_iter().find(|i| i.name() == name));
    // `--prefetch-ab`: single-row software prefetch off and on on alternate steps.
    let prefetch_ab = args.iter().any(|a| a == "--prefetch-ab");
    if prefetch_ab && other.is_some() {
        eprintln!("--vs and --prefetch-ab each alternate steps: give one of them");
        std::process::exit(2);
    }
    // The families alternated step by step; with `--prefetch-ab` the same one twice, the
    // second with the prefetch.
    let isas: Vec<Isa> = if prefetch_ab {
        vec![isa, isa]
    } else {
        std::iter::once(isa).chain(other).collect()
    };
    if let Some(o) = other {
        if !o.available() {
            eprintln!("{} is not available on this CPU", o.name());
            std::process::exit(2);
        }
    }
    pool.install(|| {
        for round in 0..5 {
            let (mut q4, mut lm) = (vec![0.0; isas.len()], vec![0.0; isas.len()]);
            let steps = 10;
            for step in 0..steps * isas.len() {
                let (x, isa) = (step % isas.len(), isas[step % isas.len()]);
                if prefetch_ab {
                    liftoff_engine::prefetch::set_single_row(x == 1);
                }
                for (i, w) in layers.iter().enumerate() {
                    let w = if hot { &layers[i % 4] } else { w };
                    let a = if w.k() == 576 { &acts576 } else { &acts1536 };
                    let t = Instant::now();
                    std::hint::black_box(gemm(w, a, rows, isa));
                    q4[x] += t.elapsed().as_secs_f64();
                }
                let t = Instant::now();
                std::hint::black_box(gemm(&head, &acts576, rows, isa));
                lm[x] += t.elapsed().as_secs_f64();
            }
            let ms = |s: f64| s / steps as f64 * 1e3;
            for (x, isa) in isas.iter().enumerate() {
                let label = match (prefetch_ab, x) {
                    (true, 0) => format!("{} without single-row prefetch", isa.name()),
                    (true, _) => format!("{} with single-row prefetch", isa.name()),
                    _ => isa.name().to_string(),
                };
                println!(
                    "round {round}: {label}: Q4_1 projections {:.2} ms, Q8_0 LM head {:.2} ms per step",
                    ms(q4[x]),
                    ms(lm[x])
                );
            }
        }
    });
}
