//! Activations quantized to 8 bits per block of 32 (llama.cpp's Q8_1 numerics), once per
//! matmul input, shared by every weight row.

use super::isa::Isa;
use half::f16;
use rayon::prelude::*;

/// Elements per block.
pub const QK: usize = 32;

/// 32 activations quantized to 8 bits: `x ≈ d * qs` with `|qs| <= 127`; `s = d * sum(qs)`
/// (rounded through f16, for Q4_1's min) and `sum = sum(qs)` (for the unsigned VNNI trick).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C, align(16))]
pub struct BlockQ8 {
    pub qs: [i8; QK],
    pub d: f32,
    pub s: f32,
    pub sum: i32,
}

impl Default for BlockQ8 {
    fn default() -> Self {
        Self {
            qs: [0; QK],
            d: 0.0,
            s: 0.0,
            sum: 0,
        }
    }
}

/// Quantizes a row of activations (length a multiple of 32) into `out`.
pub fn quantize_row_q8(xs: &[f32], out: &mut [BlockQ8]) {
    #[cfg(target_arch = "x86_64")]
    if Isa::Avx2.available() {
        // SAFETY: AVX2, FMA and F16C were detected.
        return unsafe { quantize_row_avx2(xs, out) };
    }
    quantize_row_generic(xs, out)
}

/// Quantizes `m` rows of `k` activations (row-major) into `m * k / 32` blocks, in parallel
/// when there are enough rows to pay for it.
pub fn quantize_rows(xs: &[f32], k: usize) -> Vec<BlockQ8> {
    let bpr = k / QK;
    let mut out = vec![BlockQ8::default(); xs.len() / k * bpr];
    if xs.len() >= 16 * k {
        out.par_chunks_mut(8 * bpr)
            .zip(xs.par_chunks(8 * k))
            .for_each(|(o, x)| quantize_row_q8(x, o));
    } else {
        quantize_row_q8(xs, &mut out);
    }
    out
}

/// The generic loop compiled with AVX2 enabled (vector rounding instead of `rintf` calls).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_row_avx2(xs: &[f32], out: &mut [BlockQ8]) {
    quantize_row_generic(xs, out)
}

#[inline(always)]
fn quantize_row_generic(xs: &[f32], out: &mut [BlockQ8]) {
    for (x, b) in xs.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in b.qs.iter_mut().zip(x) {
            // The clamp keeps |q| <= 127, which the SIMD kernels rely on (no i16 saturation).
            let r = (v * id).round_ties_even().clamp(-127.0, 127.0) as i32;
            *q = r as i8;
            sum += r;
        }
        // llama.cpp stores d and s as f16; round through it to keep its numerics.
        b.d = f16::from_f32(d).to_f32();
        b.s = f16::from_f32(sum as f32 * d).to_f32();
        b.sum = sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_values_stay_within_127() {
        let mut xs = vec![0f32; 96];
        xs[3] = -1.0;
        xs[40] = 1e30;
        xs[41] = -1e30;
        for (i, x) in xs[64..].iter_mut().enumerate() {
            *x = i as f32 - 16.0;
        }
        let mut out = vec![BlockQ8::default(); 3];
        quantize_row_q8(&xs, &mut out);
        let mut plain = vec![BlockQ8::default(); 3];
        quantize_row_generic(&xs, &mut plain);
        assert_eq!(
            out, plain,
            "the AVX2 build of the loop must equal the plain one"
        );
        for b in &out {
            assert!(b.qs.iter().all(|&q| (-127..=127).contains(&q)));
            assert_eq!(b.sum, b.qs.iter().map(|&q| q as i32).sum::<i32>());
        }
        assert_eq!(out[0].qs[3], -127);
        assert_eq!((out[1].qs[8], out[1].qs[9]), (127, -127));
        // An all-zero block has a zero scale and zero values.
        let zero = [0f32; 32];
        let mut z = [BlockQ8::default()];
        quantize_row_q8(&zero, &mut z);
        assert_eq!((z[0].d, z[0].sum), (0.0, 0));
    }
}
