//! Element-wise steps of the forward pass (RMS norm, SiLU(gate) * up, residual add) for f32
//! and bf16 CPU tensors, fused into one pass each (bf16 widened to f32, computed in f32 and
//! rounded once at the end). candle runs each of these as one or two parallel
//! regions; at decode sizes (a few rows of 576 values) waking the pool costs more than the
//! work, so small inputs run on the calling thread and large ones split rows over rayon.
//! Other dtypes and devices return `None` and the caller uses candle.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

/// Below this many values an op runs on the calling thread.
const PARALLEL_FROM: usize = 1 << 15;

/// Runs `f` on the values of a contiguous f32 or bf16 CPU tensor as f32 (in place for f32,
/// widened exactly for bf16); `None` for anything else.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !matches!(t.dtype(), DType::F32 | DType::BF16) || !t.device().is_cpu() || !t.is_contiguous()
    {
        return None;
    }
    let wide;
    let t = if t.dtype() == DType::F32 {
        t
    } else {
        wide = t.to_dtype(DType::F32).ok()?;
        &wide
    };
    liftoff_kernels::with_cpu_f32(t, "input", f).ok()
}

/// `v` as a tensor of `like`'s dtype, shape `shape`.
fn output(
    v: Vec<f32>,
    shape: impl Into<candle_core::Shape>,
    like: &Tensor,
) -> candle_core::Result<Tensor> {
    Tensor::from_vec(v, shape, like.device())?.to_dtype(like.dtype())
}

/// Applies `f` to every `row`-long chunk of `out` with its index.
fn for_rows(out: &mut [f32], row: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if out.len() >= PARALLEL_FROM {
        out.par_chunks_mut(row)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    } else {
        out.chunks_mut(row).enumerate().for_each(|(i, r)| f(i, r));
    }
}

/// `sum(x^2)` in 8 interleaved partial sums (vectorised; a fixed order, so the same row always
/// gives the same bits), then the tail.
fn sum_of_squares(r: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = r.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x * x;
        }
    }
    tail.iter().fold(acc.iter().sum::<f32>(), |s, x| s + x * x)
}

/// `x / rms(x) * weight` over the last dimension.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<Option<Tensor>> {
    let dim = weight.elem_count();
    if dim == 0 || x.dims().last() != Some(&dim) {
        return Ok(None);
    }
    let out = with_f32(x, |xs| {
        with_f32(weight, |w| {
            let mut v = xs.to_vec();
            for_rows(&mut v, dim, |_, r| {
                let ms = sum_of_squares(r) / dim as f32;
                let inv = 1.0 / (ms + eps).sqrt();
                for (a, g) in r.iter_mut().zip(w) {
                    *a = *a * inv * g;
                }
            });
            v
        })
    });
    match out.flatten() {
        Some(v) => Ok(Some(output(v, x.shape(), x)?)),
        None => Ok(None),
    }
}

/// `silu(gate) * up` of a fused `[rows, 2 * half]` gate/up output: `[rows, half]`.
pub fn silu_mul_halves(gu: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let Ok((rows, width)) = gu.dims2() else {
        return Ok(None);
    };
    let half = width / 2;
    if half == 0 || width % 2 != 0 {
        return Ok(None);
    }
    let out = with_f32(gu, |v| {
        let mut out = vec![0f32; rows * half];
        for_rows(&mut out, half, |i, r| {
            let (g, u) = v[i * width..(i + 1) * width].split_at(half);
            liftoff_kernels::elementwise::silu_mul(g, u, r);
        });
        out
    });
    match out {
        Some(v) => Ok(Some(output(v, (rows, half), gu)?)),
        None => Ok(None),
    }
}

/// `a + b`, same shapes.
pub fn add(a: &Tensor, b: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if a.dims() != b.dims() || a.dtype() != b.dtype() {
        return Ok(None);
    }
    let row = *a.dims().last().unwrap_or(&1).max(&1);
    let out = with_f32(a, |x| {
        with_f32(b, |y| {
            let mut out = x.to_vec();
            for_rows(&mut out, row, |i, r| {
                for (p, q) in r.iter_mut().zip(&y[i * row..]) {
                    *p += q;
                }
            });
            out
        })
    });
    match out.flatten() {
        Some(v) => Ok(Some(output(v, a.shape(), a)?)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(rows: usize, cols: usize, seed: u32) -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 250.0 - 2.0
            })
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    /// Every value within `abs + rel * |reference|` of the reference, and finite.
    fn close(a: &Tensor, b: &Tensor, abs: f32, rel: f32) {
        let f = |t: &Tensor| {
            let t = t.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
            t.to_vec1::<f32>().unwrap()
        };
        let (a, b) = (f(a), f(b));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!(
                x.is_finite() && y.is_finite() && (x - y).abs() <= abs + rel * y.abs(),
                "{x} vs candle {y}"
            );
        }
    }

    /// Against candle's ops (independent implementations), below and above the parallel size.
    /// In bf16 the reference is candle's f32 op on the same (widened) inputs: ours rounds that
    /// once, so it is within half a bf16 step (2^-8 relative) of it.
    #[test]
    fn match_candle() {
        for dtype in [DType::F32, DType::BF16] {
            let (abs, rel) = if dtype == DType::F32 {
                (1e-5, 0.0)
            } else {
                (1e-5, 1.0 / 256.0)
            };
            for rows in [1, 3, 200] {
                let (x, y) = (t(rows, 576, 1), t(rows, 576, 7));
                let w = t(1, 576, 3).squeeze(0).unwrap();
                let r = |t: &Tensor| t.to_dtype(dtype).unwrap();
                // The reference's inputs: rounded to `dtype` and widened back.
                let f = |t: &Tensor| r(t).to_dtype(DType::F32).unwrap();
                let got = rms_norm(&r(&x), &r(&w), 1e-5).unwrap().unwrap();
                assert_eq!(got.dtype(), dtype);
                close(
                    &got,
                    &candle_nn::ops::rms_norm(&f(&x), &f(&w), 1e-5).unwrap(),
                    abs,
                    rel,
                );
                let want = (candle_nn::ops::silu(&f(&x)).unwrap() * f(&y)).unwrap();
                let fused = Tensor::cat(&[r(&x), r(&y)], 1).unwrap();
                close(&silu_mul_halves(&fused).unwrap().unwrap(), &want, abs, rel);
                // One rounding of the same sum: candle's bits.
                let sum = add(&r(&x), &r(&y)).unwrap().unwrap();
                close(&sum, &(r(&x) + r(&y)).unwrap(), 0.0, 0.0);
            }
        }
        // Neither f32 nor bf16: candle's turn.
        let h = t(2, 64, 1).to_dtype(DType::F16).unwrap();
        assert!(add(&h, &h).unwrap().is_none());
    }
}
