//! Products of a few activation rows with dense CPU weights (f32 or bf16), the decode case.
//!
//! candle's CPU matmul packs both operands for a GEMM, which at one to a few rows leaves most
//! of the memory bandwidth unused; decoding a dense model is a pass over its weights per step,
//! so this kernel streams each weight row once, dots it with every activation row from L1/L2,
//! and splits the rows over the rayon pool (one task per thread). Larger batches go to candle.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::bf16;
use liftoff_kernels::DisjointOut;
use rayon::prelude::*;

/// Most activation rows this kernel takes; more go to candle's GEMM.
pub const MAX_ROWS: usize = 8;

/// A weight element that widens to f32.
trait Elem: Copy + Send + Sync {
    fn f32(self) -> f32;
}
impl Elem for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}
impl Elem for bf16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// `x: [m, k]` times `w: [n, k]`ᵀ, when `w` is a contiguous CPU f32/bf16 tensor and
/// `m <= MAX_ROWS`; `None` otherwise (the caller uses candle).
pub fn try_matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let (m, k) = x.dims2()?;
    let (n, wk) = w.dims2()?;
    if m == 0 || m > MAX_ROWS || k != wk || !w.device().is_cpu() {
        return Ok(None);
    }
    let (storage, layout) = w.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Ok(None);
    };
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let out = match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => rows_times(&v[start..end], &xs, m, n, k),
        Storage::Cpu(CpuStorage::BF16(v)) => rows_times(&v[start..end], &xs, m, n, k),
        _ => return Ok(None),
    };
    Ok(Some(
        Tensor::from_vec(out, (m, n), &Device::Cpu)?.to_dtype(x.dtype())?,
    ))
}

fn rows_times<W: Elem>(w: &[W], xs: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    let tasks = rayon::current_num_threads().clamp(1, n.max(1));
    let per = n.div_ceil(tasks);
    let ptr = DisjointOut::new(&mut out);
    let simd = simd_level();
    (0..tasks).into_par_iter().for_each(|t| {
        for r in t * per..((t + 1) * per).min(n) {
            let row = &w[r * k..(r + 1) * k];
            for a in 0..m {
                let x = &xs[a * k..(a + 1) * k];
                let v = dot_dispatch(simd, row, x);
                // SAFETY: a < m and r < n; row r belongs to this task only.
                unsafe { *ptr.at(a * n + r) = v };
            }
        }
    });
    out
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Simd {
    None,
    Avx2,
    Avx512,
}

fn simd_level() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return Simd::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Simd::Avx2;
        }
    }
    Simd::None
}

#[inline(always)]
fn dot_dispatch<W: Elem>(simd: Simd, w: &[W], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    match simd {
        // SAFETY: the features were detected at run time.
        Simd::Avx512 => return unsafe { dot_avx512(w, x) },
        Simd::Avx2 => return unsafe { dot_avx2(w, x) },
        Simd::None => {}
    }
    let _ = simd;
    dot(w, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dot_avx512<W: Elem>(w: &[W], x: &[f32]) -> f32 {
    dot(w, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2<W: Elem>(w: &[W], x: &[f32]) -> f32 {
    dot(w, x)
}

/// A dot product with 32 independent lanes (no serial dependency, so it vectorizes).
#[inline(always)]
fn dot<W: Elem>(w: &[W], x: &[f32]) -> f32 {
    const L: usize = 32;
    let mut acc = [0f32; L];
    let (wc, xc) = (w.chunks_exact(L), x.chunks_exact(L));
    let (wr, xr) = (wc.remainder(), xc.remainder());
    for (a, b) in wc.zip(xc) {
        for i in 0..L {
            acc[i] += a[i].f32() * b[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in wr.iter().zip(xr) {
        s += a.f32() * b;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::tests::random;

    /// Against candle's matmul (an independent implementation), f32 and bf16 weights, odd
    /// shapes; f32 sums in another order differ by rounding only.
    #[test]
    fn matches_candle_matmul() {
        for (n, k) in [(7, 33), (64, 96), (130, 257)] {
            let wf = Tensor::from_vec(random(n * k, 1), (n, k), &Device::Cpu).unwrap();
            for w in [wf.clone(), wf.to_dtype(DType::BF16).unwrap()] {
                for m in [1, 3, MAX_ROWS] {
                    let x = Tensor::from_vec(random(m * k, m as u64), (m, k), &Device::Cpu)
                        .unwrap()
                        .to_dtype(w.dtype())
                        .unwrap();
                    let got = try_matmul_t(&x, &w).unwrap().expect("kernel applies");
                    let want = x
                        .to_dtype(DType::F32)
                        .unwrap()
                        .matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
                        .unwrap();
                    let got = got.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
                    let want = want.to_vec2::<f32>().unwrap();
                    for (g, r) in got.iter().flatten().zip(want.iter().flatten()) {
                        // bf16 outputs are rounded to 8 significant bits: 2 ulps relative.
                        let tol = if w.dtype() == DType::F32 {
                            1e-4
                        } else {
                            8e-3 * r.abs().max(1.0)
                        };
                        assert!(
                            g.is_finite() && (g - r).abs() <= tol,
                            "{n}x{k} m={m}: {g} vs {r}"
                        );
                    }
                }
            }
        }
        // Too many rows: candle's turn.
        let w = Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap();
        let x = Tensor::zeros((MAX_ROWS + 1, 32), DType::F32, &Device::Cpu).unwrap();
        assert!(try_matmul_t(&x, &w).unwrap().is_none());
    }
}
