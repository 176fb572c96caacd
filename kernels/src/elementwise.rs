//! Element-wise math of the forward pass on the CPU: `silu(gate) * up`, and the polynomial
//! `exp` it shares with attention's softmax. The AVX2 path (chosen at run time) is within a
//! few ulp of the scalar formula; both are tested against f64.

/// `out[i] = silu(gate[i]) * up[i]`, `silu(a) = a / (1 + e^-a)`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == out.len() && up.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA were detected; the lengths were checked.
        return unsafe { x86::silu_mul(gate, up, out) };
    }
    silu_mul_scalar(gate, up, out)
}

/// [`silu_mul`] one value at a time with the standard library's `exp`.
pub fn silu_mul_scalar(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &a), &b) in out.iter_mut().zip(gate).zip(up) {
        *o = a / (1.0 + (-a).exp()) * b;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// 8 values at a time: `sigmoid(a)` from `t = e^-|a|` (in `exp`'s tested range, never
    /// overflowing) as `1 / (1 + t)` for `a >= 0` and `t / (1 + t)` below; NaN stays NaN.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = out.len();
        let full = n / 8 * 8;
        let one = _mm256_set1_ps(1.0);
        let sign = _mm256_set1_ps(-0.0);
        for i in (0..full).step_by(8) {
            let a = _mm256_loadu_ps(gate.as_ptr().add(i));
            let b = _mm256_loadu_ps(up.as_ptr().add(i));
            let t = exp(_mm256_or_ps(a, sign));
            let negative = _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_LT_OQ);
            let s = _mm256_div_ps(_mm256_blendv_ps(one, t, negative), _mm256_add_ps(one, t));
            _mm256_storeu_ps(
                out.as_mut_ptr().add(i),
                _mm256_mul_ps(_mm256_mul_ps(a, s), b),
            );
        }
        super::silu_mul_scalar(&gate[full..], &up[full..], &mut out[full..]);
    }

    /// `e^x` for `x <= 0` (scores minus their maximum), within 2 ulp of the true value down to
    /// `x = -87` and flushed towards 0 below; NaN stays NaN. Cephes' `expf`: `x = n ln 2 + r`,
    /// `|r| <= ln 2 / 2`, a degree-6 polynomial in `r`, times `2^n`.
    #[inline(always)]
    pub unsafe fn exp(x: __m256) -> __m256 {
        // `max(lo, x)` returns `x` when it is NaN, so NaN is kept.
        let x = _mm256_max_ps(_mm256_set1_ps(-87.0), x);
        let x = _mm256_min_ps(_mm256_set1_ps(88.0), x);
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm256_set1_ps(1.987_569_2e-4);
        for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
        }
        let y = _mm256_fmadd_ps(
            y,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let pow2n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        _mm256_mul_ps(y, pow2n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn silu_f64(a: f32, b: f32) -> f64 {
        let a = a as f64;
        a / (1.0 + (-a).exp()) * b as f64
    }

    /// Both paths against f64 over the range activations take, with the tails (the vector
    /// loop's remainder) and NaN.
    #[test]
    fn silu_mul_is_within_a_few_ulp_of_f64() {
        let gate: Vec<f32> = (0..=40_003)
            .map(|i| -90.0 + 180.0 * i as f32 / 40_003.0)
            .chain([0.0, -0.0, 1e-30, -1e-30, 1e-6, -1e-6])
            .collect();
        let up: Vec<f32> = (0..gate.len())
            .map(|i| 0.5 + (i % 7) as f32 * 0.25)
            .collect();
        for (name, f) in [
            ("dispatch", silu_mul as fn(&[f32], &[f32], &mut [f32])),
            ("scalar", silu_mul_scalar),
        ] {
            let mut out = vec![0f32; gate.len()];
            f(&gate, &up, &mut out);
            for ((&a, &b), &y) in gate.iter().zip(&up).zip(&out) {
                let want = silu_f64(a, b);
                let err = (y as f64 - want).abs();
                // 4 ulp of the result; below 1e-30 (a < -65: exp flushes its input at -87)
                // absolutely, far under anything the next matmul's sums can resolve.
                let tol = (4.0 * f32::EPSILON as f64 * want.abs()).max(1e-30);
                assert!(
                    y.is_finite() && err <= tol,
                    "{name}: silu({a}) * {b} = {y}, want {want}"
                );
            }
        }
        let gate = [1.0, f32::NAN, -2.0, 3.0, f32::NAN, 0.5, -0.5, 4.0, f32::NAN];
        let mut out = [0f32; 9];
        silu_mul(&gate, &[1.0; 9], &mut out);
        for (a, y) in gate.iter().zip(out) {
            assert_eq!(a.is_nan(), y.is_nan(), "silu({a}) = {y}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    /// The polynomial `exp` against the standard library over the softmax range, with its
    /// ends, and NaN.
    #[test]
    fn exp_is_within_two_ulp() {
        use std::arch::x86_64::*;
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            eprintln!("skipped: this CPU has no AVX2/FMA");
            return;
        }
        let mut xs: Vec<f32> = (0..=200_000)
            .map(|i| -87.0 * i as f32 / 200_000.0)
            .collect();
        xs.extend([0.0, -0.0, -1e-30, -86.99, f32::MIN_POSITIVE]);
        for chunk in xs.chunks(8) {
            let mut buf = [0f32; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            // SAFETY: AVX2 and FMA detected above.
            unsafe { _mm256_storeu_ps(buf.as_mut_ptr(), x86::exp(_mm256_loadu_ps(buf.as_ptr()))) };
            for (&x, &y) in chunk.iter().zip(&buf) {
                let want = x.exp();
                let ulp = (want.to_bits() as i64 - y.to_bits() as i64).abs();
                assert!(
                    y.is_finite() && ulp <= 2,
                    "exp({x}) = {y}, want {want} ({ulp} ulp)"
                );
            }
        }
        let mut buf = [f32::NAN, -1.0, 0.0, f32::NAN, -5.0, -0.5, f32::NAN, -2.0];
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(buf.as_mut_ptr(), x86::exp(_mm256_loadu_ps(buf.as_ptr()))) };
        assert!(buf[0].is_nan() && buf[3].is_nan() && buf[6].is_nan());
        assert!(buf[1].is_finite() && buf[2] == 1.0);
    }
}
