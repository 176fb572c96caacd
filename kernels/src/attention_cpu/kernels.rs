//! The inner loops of CPU attention, one implementation per instruction-set family. Each is
//! a fixed function of one row's inputs (never of how rows are grouped), which is what keeps
//! batching bit-exact.

/// What a CPU KV cache holds: f32, or f16 (half the bytes to stream per decode step).
pub(crate) trait Elem: Copy + Send + Sync {
    fn to_f32(self) -> f32;

    /// Eight values at `p` as f32 lanes.
    ///
    /// # Safety
    /// AVX2 and F16C; eight values readable at `p`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl Elem for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
}

/// One family's loops.
pub(super) trait Kernels {
    /// `s[r * stride + j] = scale * (q_r · k[offsets[j]..][..d])` for the rows of `q`
    /// (`rows x d`) and the positions `j` of `offsets`.
    fn scores<E: Elem>(
        q: &[f32],
        d: usize,
        k: &[E],
        offsets: &[usize],
        scale: f32,
        s: &mut [f32],
        stride: usize,
    );
    /// `row = exp(row - max(row))` in place; returns `(max, sum of the exponentials)`.
    fn exp_row(row: &mut [f32]) -> (f32, f32);
    /// `o_r += sum over positions j of p[r * stride + j] * v[offsets[j]..][..d]` for the
    /// rows of `o` (`rows x d`), in position order per element.
    fn pv<E: Elem>(o: &mut [f32], d: usize, p: &[f32], stride: usize, offsets: &[usize], v: &[E]);
    /// `e^x` for one value, as `exp_row` computes it.
    fn exp1(x: f32) -> f32;
    /// `o = o * a + y * b`, element by element, with one fused multiply-add each.
    fn scale_add(o: &mut [f32], a: f32, y: &[f32], b: f32) {
        for (x, &y) in o.iter_mut().zip(y) {
            *x = x.mul_add(a, y * b);
        }
    }
}

/// Portable loops.
pub(super) struct Plain;

impl Kernels for Plain {
    fn scores<E: Elem>(
        q: &[f32],
        d: usize,
        k: &[E],
        offsets: &[usize],
        scale: f32,
        s: &mut [f32],
        stride: usize,
    ) {
        for (q, s) in q.chunks_exact(d).zip(s.chunks_mut(stride)) {
            for (s, &off) in s.iter_mut().zip(offsets) {
                *s = dot(q, &k[off..off + d]) * scale;
            }
        }
    }

    fn exp_row(row: &mut [f32]) -> (f32, f32) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut sum = 0f32;
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        (max, sum)
    }

    fn pv<E: Elem>(o: &mut [f32], d: usize, p: &[f32], stride: usize, offsets: &[usize], v: &[E]) {
        for (o, p) in o.chunks_exact_mut(d).zip(p.chunks(stride)) {
            for (&p, &off) in p.iter().zip(offsets) {
                for (o, x) in o.iter_mut().zip(&v[off..off + d]) {
                    *o = p.mul_add(x.to_f32(), *o);
                }
            }
        }
    }

    fn exp1(x: f32) -> f32 {
        x.exp()
    }
}

/// `a · b` with eight partial sums.
fn dot<E: Elem>(a: &[f32], b: &[E]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] = x[i].mul_add(y[i].to_f32(), acc[i]);
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for (x, y) in ar.iter().zip(br) {
        s = x.mul_add(y.to_f32(), s);
    }
    s
}
