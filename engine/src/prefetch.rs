//! Whether the CPU kernels prefetch weights in software for a single activation row.
//!
//! With several rows the dense and int8 kernels ask for the weights ahead, which pays on every
//! CPU measured. With one row (a lone stream's decode) the weights stream in order, and CPUs
//! differ: on an AMD Zen 4 the hardware prefetcher keeps up and the prefetch instructions only
//! cost issue slots (a token 4-8 % slower in dense f32, up to 6 % in bf16, ~4 % in int8,
//! alternated per token in one process, 2026-12-03), while on an Intel Xeon (Sapphire Rapids
//! class) a bf16 dense token took 22 % less time with them (see `docs/benchmarks.md`). So the
//! default follows the CPU's vendor; [`set_single_row`] overrides it (the examples' A/B runs).

use std::sync::atomic::{AtomicU8, Ordering};

/// 0: not decided yet, 1: no, 2: yes.
static SINGLE_ROW: AtomicU8 = AtomicU8::new(0);

/// Whether kernels over a single activation row prefetch their weights in software.
pub fn single_row() -> bool {
    match SINGLE_ROW.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let yes = intel();
            SINGLE_ROW.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
            yes
        }
    }
}

/// Sets [`single_row`] for the whole process.
pub fn set_single_row(on: bool) {
    SINGLE_ROW.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// Whether the CPU reports itself as "GenuineIntel".
fn intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let r = std::arch::x86_64::__cpuid(0);
        let mut vendor = [0u8; 12];
        vendor[..4].copy_from_slice(&r.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&r.edx.to_le_bytes());
        vendor[8..].copy_from_slice(&r.ecx.to_le_bytes());
        &vendor == b"GenuineIntel"
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_vendor_is_read_from_cpuid() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let Some(line) = cpuinfo.lines().find(|l| l.starts_with("vendor_id")) else {
            println!("skipped: no vendor_id in /proc/cpuinfo");
            return;
        };
        assert_eq!(super::intel(), line.contains("GenuineIntel"), "{line}");
    }
}
