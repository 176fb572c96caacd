//! `liftoff bench limits`: the machine's limits as JSON, for `benches/cpu.sh`.

use liftoff_engine::quant::{limits, Isa, WeightKind};
use serde_json::{json, Value};

/// Measures and describes this machine.
pub fn measure() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpu.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags: Vec<&str> = cpu
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| {
            v.split_whitespace()
                .filter(|f| {
                    [
                        "avx2",
                        "fma",
                        "f16c",
                        "avx512f",
                        "avx512bw",
                        "avx512vl",
                        "avx512_vnni",
                        "avx_vnni",
                        "avx512_bf16",
                        "amx_tile",
                        "amx_int8",
                        "amx_bf16",
                    ]
                    .contains(f)
                })
                .collect()
        })
        .unwrap_or_default();
    let threads = rayon::current_num_threads();
    let mut families = Vec::new();
    for isa in Isa::ALL {
        if !isa.available() {
            families.push(json!({"isa": isa.name(), "available": false}));
            continue;
        }
        families.push(json!({
            "isa": isa.name(),
            "available": true,
            "int8_peak_macs_per_s": limits::int8_peak(isa),
            "gemm_q4_1_512x1536x576_macs_per_s": limits::gemm_rate(isa, WeightKind::Q4_1, 512, 1536, 576, 3),
            "gemm_q4_1_16x1536x576_macs_per_s": limits::gemm_rate(isa, WeightKind::Q4_1, 16, 1536, 576, 20),
            "gemm_q8_0_512x1536x576_macs_per_s": limits::gemm_rate(isa, WeightKind::Q8_0, 512, 1536, 576, 3),
        }));
    }
    json!({
        "cpu": field("model name"),
        "flags": flags,
        "threads": threads,
        "detected_isa": Isa::detect().name(),
        "read_bandwidth_bytes_per_s": limits::read_bandwidth(512 << 20, 5),
        "kernels": families,
    })
}

/// The read-bandwidth loop timed pass by pass for `seconds`, as JSON.
pub fn bandwidth(bytes: usize, seconds: f64) -> Value {
    let s = limits::read_bandwidth_series(bytes, seconds);
    json!({
        "bytes_per_pass": s.bytes_per_pass,
        "seconds": s.seconds(),
        "mean_bytes_per_s": s.mean(),
        "best_bytes_per_s": s.best(),
        "pass_bytes_per_s": s.rates(),
    })
}
