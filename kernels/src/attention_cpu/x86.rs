//! AVX2 + FMA attention loops: scores for two query rows x four keys at a time (each key
//! loaded once for both rows, one horizontal reduction per four keys), exponentials with a
//! polynomial `exp`, and `P V` for two rows with 32 output values each in registers (64 for a
//! lone row).

use super::kernels::Elem;
use crate::elementwise::x86::exp;
use std::arch::x86_64::*;

/// Whether this CPU has the family's instructions.
pub(super) fn available() -> bool {
    static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX2.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// The AVX2 + FMA (+ F16C for f16 caches) family; use only after [`available`].
pub(super) struct Avx2;

impl super::Kernels for Avx2 {
    fn scores<E: Elem>(
        q: &[f32],
        d: usize,
        k: &[E],
        offsets: &[usize],
        scale: f32,
        s: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: `Avx2` is only used after `available()`.
        unsafe { scores(q, d, k, offsets, scale, s, stride) }
    }

    fn exp_row(row: &mut [f32]) -> (f32, f32) {
        // SAFETY: as above.
        unsafe { exp_row(row) }
    }

    fn pv<E: Elem>(o: &mut [f32], d: usize, p: &[f32], stride: usize, offsets: &[usize], v: &[E]) {
        // SAFETY: as above.
        unsafe { pv(o, d, p, stride, offsets, v) }
    }

    fn exp1(x: f32) -> f32 {
        // SAFETY: as above.
        unsafe { exp1(x) }
    }

    fn scale_add(o: &mut [f32], a: f32, y: &[f32], b: f32) {
        // SAFETY: as above.
        unsafe { scale_add(o, a, y, b) }
    }
}

/// The trait's default loop, compiled with FMA (a fused multiply-add instruction, not a
/// library call); the same operations, so the same bits.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale_add(o: &mut [f32], a: f32, y: &[f32], b: f32) {
    for (x, &y) in o.iter_mut().zip(y) {
        *x = x.mul_add(a, y * b);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores<E: Elem>(
    q: &[f32],
    d: usize,
    k: &[E],
    offsets: &[usize],
    scale: f32,
    s: &mut [f32],
    stride: usize,
) {
    let (rows, n) = (q.len() / d, offsets.len());
    if rows == 0 || n == 0 {
        return;
    }
    assert!(n <= stride && s.len() >= (rows - 1) * stride + n);
    assert!(offsets.iter().all(|&off| off + d <= k.len()));
    let mut r = 0;
    // SAFETY: AVX2 and FMA are enabled; the bounds are checked above.
    unsafe {
        while r + 2 <= rows {
            scores_rows::<E, 2>(
                &q[r * d..],
                d,
                k,
                offsets,
                scale,
                &mut s[r * stride..],
                stride,
            );
            r += 2;
        }
        if r < rows {
            scores_rows::<E, 1>(
                &q[r * d..],
                d,
                k,
                offsets,
                scale,
                &mut s[r * stride..],
                stride,
            );
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp_row(row: &mut [f32]) -> (f32, f32) {
    let n = row.len();
    let n8 = n - n % 8;
    // SAFETY: AVX2 and FMA are enabled; loads and stores stay within
    // `row[..n8]` or the local tail buffer.
    unsafe {
        let p = row.as_mut_ptr();
        // A NaN score need not survive the max: it reaches the output through `exp`.
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        for c in (0..n8).step_by(8) {
            m = _mm256_max_ps(m, _mm256_loadu_ps(p.add(c)));
        }
        let mut max = hmax(m);
        for &x in &row[n8..] {
            max = max.max(x);
        }
        let mv = _mm256_set1_ps(max);
        let mut acc = _mm256_setzero_ps();
        for c in (0..n8).step_by(8) {
            let e = exp(_mm256_sub_ps(_mm256_loadu_ps(p.add(c)), mv));
            _mm256_storeu_ps(p.add(c), e);
            acc = _mm256_add_ps(acc, e);
        }
        let mut sum = hsum(acc);
        if n8 < n {
            let mut tail = [0f32; 8];
            tail[..n - n8].copy_from_slice(&row[n8..]);
            let e = exp(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), mv));
            _mm256_storeu_ps(tail.as_mut_ptr(), e);
            for (x, e) in row[n8..].iter_mut().zip(tail) {
                *x = e;
                sum += e;
            }
        }
        (max, sum)
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pv<E: Elem>(
    o: &mut [f32],
    d: usize,
    p: &[f32],
    stride: usize,
    offsets: &[usize],
    v: &[E],
) {
    let (rows, n) = (o.len() / d, offsets.len());
    if rows == 0 || n == 0 {
        return;
    }
    assert!(n <= stride && p.len() >= (rows - 1) * stride + n);
    assert!(offsets.iter().all(|&off| off + d <= v.len()));
    let mut r = 0;
    // SAFETY: AVX2 and FMA are enabled; the bounds are checked above.
    unsafe {
        while r + 2 <= rows {
            let (o, p) = (&mut o[r * d..(r + 2) * d], &p[r * stride..]);
            pv_columns::<E, 2, 4>(o, d, p, stride, offsets, v);
            r += 2;
        }
        if r < rows {
            let (o, p) = (&mut o[r * d..(r + 1) * d], &p[r * stride..]);
            pv_columns::<E, 1, 8>(o, d, p, stride, offsets, v);
        }
    }
}

/// All `d` columns of `R` output rows: slabs of `8W` columns, then of 8, then one by one.
///
/// # Safety
/// As [`pv_rows`] for every slab: `o.len() >= R * d`, `p.len() >= (R - 1) * stride + n`,
/// `off + d <= v.len()` for every offset.
#[inline(always)]
unsafe fn pv_columns<E: Elem, const R: usize, const W: usize>(
    o: &mut [f32],
    d: usize,
    p: &[f32],
    stride: usize,
    offsets: &[usize],
    v: &[E],
) {
    let mut c = 0;
    while c + 8 * W <= d {
        pv_rows::<E, R, W>(o, d, p, stride, offsets, v, c);
        c += 8 * W;
    }
    while c + 8 <= d {
        pv_rows::<E, R, 1>(o, d, p, stride, offsets, v, c);
        c += 8;
    }
    pv_tail(o, d, p, stride, offsets, v, c);
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp1(x: f32) -> f32 {
    // SAFETY: AVX2 and FMA are enabled.
    unsafe { _mm256_cvtss_f32(exp(_mm256_set1_ps(x))) }
}

/// Scores of `R` rows (`q`: `R x d`) against every key; `s`: rows `stride` apart.
///
/// # Safety
/// AVX2, FMA and F16C; `off + d <= k.len()` for every offset, `q.len() >= R * d`,
/// `s.len() >= (R - 1) * stride + n`.
#[inline(always)]
unsafe fn scores_rows<E: Elem, const R: usize>(
    q: &[f32],
    d: usize,
    k: &[E],
    offsets: &[usize],
    scale: f32,
    s: &mut [f32],
    stride: usize,
) {
    let n = offsets.len();
    let d8 = d - d % 8;
    let (pq, pk) = (q.as_ptr(), k.as_ptr());
    let mut j = 0;
    while j < n {
        // Four keys; past the end the last key is repeated and its extra sums dropped (each
        // key's sum is its own lane, so its neighbours change no bit of it).
        let last = n - 1;
        let offs = [
            offsets[j],
            offsets[(j + 1).min(last)],
            offsets[(j + 2).min(last)],
            offsets[(j + 3).min(last)],
        ];
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        let mut c = 0;
        while c < d8 {
            let mut x = [_mm256_setzero_ps(); R];
            for (r, x) in x.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(pq.add(r * d + c));
            }
            for (i, &off) in offs.iter().enumerate() {
                let kv = E::load8(pk.add(off + c));
                for r in 0..R {
                    acc[r][i] = _mm256_fmadd_ps(x[r], kv, acc[r][i]);
                }
            }
            c += 8;
        }
        for r in 0..R {
            if d8 == d && j + 4 <= n {
                // No tail columns and four real keys: scaled and stored as one vector (the
                // same multiplications as the loop below).
                let out = _mm_mul_ps(reduce4(acc[r]), _mm_set1_ps(scale));
                _mm_storeu_ps(s.as_mut_ptr().add(r * stride + j), out);
                continue;
            }
            let mut sums = [0f32; 4];
            _mm_storeu_ps(sums.as_mut_ptr(), reduce4(acc[r]));
            for (i, (mut sum, off)) in sums.into_iter().zip(offs).enumerate().take(n - j) {
                for e in d8..d {
                    sum = q[r * d + e].mul_add(k[off + e].to_f32(), sum);
                }
                s[r * stride + j + i] = sum * scale;
            }
        }
        j += 4;
    }
}

/// Columns `c..c + 8W` of `R` output rows (`o`: `R x d`, `p`: rows `stride` apart).
///
/// # Safety
/// AVX2, FMA and F16C; `c + 8W <= d`, `o.len() >= R * d`, `p.len() >= (R - 1) * stride + n` and
/// `off + d <= v.len()` for every offset.
#[inline(always)]
unsafe fn pv_rows<E: Elem, const R: usize, const W: usize>(
    o: &mut [f32],
    d: usize,
    p: &[f32],
    stride: usize,
    offsets: &[usize],
    v: &[E],
    c: usize,
) {
    let po = o.as_mut_ptr();
    let mut acc = [[_mm256_setzero_ps(); W]; R];
    for (r, acc) in acc.iter_mut().enumerate() {
        for (w, a) in acc.iter_mut().enumerate() {
            *a = _mm256_loadu_ps(po.add(r * d + c + 8 * w));
        }
    }
    for (j, &off) in offsets.iter().enumerate() {
        let pv = v.as_ptr().add(off + c);
        let mut weight = [_mm256_setzero_ps(); R];
        for (r, x) in weight.iter_mut().enumerate() {
            *x = _mm256_set1_ps(*p.get_unchecked(r * stride + j));
        }
        #[allow(clippy::needless_range_loop)] // `w` indexes the inner arrays of `acc`
        for w in 0..W {
            let x = E::load8(pv.add(8 * w));
            for (acc, &weight) in acc.iter_mut().zip(&weight) {
                acc[w] = _mm256_fmadd_ps(weight, x, acc[w]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (w, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(po.add(r * d + c + 8 * w), *a);
        }
    }
}

/// Columns `c..d` element by element (the same fused multiply-add in position order).
fn pv_tail<E: Elem>(
    o: &mut [f32],
    d: usize,
    p: &[f32],
    stride: usize,
    offsets: &[usize],
    v: &[E],
    c: usize,
) {
    for (o, p) in o.chunks_exact_mut(d).zip(p.chunks(stride)) {
        for e in c..d {
            for (&p, &off) in p.iter().zip(offsets) {
                o[e] = p.mul_add(v[off + e].to_f32(), o[e]);
            }
        }
    }
}

/// The four horizontal sums of `acc`, one per lane, each `((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))`.
#[inline(always)]
unsafe fn reduce4(acc: [__m256; 4]) -> __m128 {
    let t01 = _mm256_hadd_ps(acc[0], acc[1]);
    let t23 = _mm256_hadd_ps(acc[2], acc[3]);
    let u = _mm256_hadd_ps(t01, t23);
    _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1))
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)))
}

#[inline(always)]
unsafe fn hmax(v: __m256) -> f32 {
    let h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)))
}

#[cfg(test)]
mod tests {
    use super::super::Kernels;
    use super::*;

    /// A row's scores and `P V` are the same bits whether it is computed alone or in a pass
    /// with another row, for every row count a GQA group can have here.
    #[test]
    fn rows_give_the_same_bits_in_any_pass() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX2, FMA or F16C");
            return;
        }
        for (d, n) in [(72, 37), (64, 37), (64, 64)] {
            check_rows(d, n);
        }
    }

    fn check_rows(d: usize, n: usize) {
        let value = |i: usize| ((i * 7919) % 1000) as f32 / 500.0 - 1.0;
        let k: Vec<half::f16> = (0..n * d + 5)
            .map(|i| half::f16::from_f32(value(i + 3)))
            .collect();
        let offsets: Vec<usize> = (0..n).map(|j| (n - 1 - j) * d).collect();
        for rows in 1..=7 {
            let q: Vec<f32> = (0..rows * d).map(|i| value(i * 3 + 1)).collect();
            let stride = n + 3;
            let mut all = vec![0f32; rows * stride];
            Avx2::scores(&q, d, &k, &offsets, 0.125, &mut all, stride);
            let p: Vec<f32> = all.iter().map(|x| x.abs()).collect();
            let mut o_all = vec![0.5f32; rows * d];
            Avx2::pv(&mut o_all, d, &p, stride, &offsets, &k);
            for r in 0..rows {
                let mut one = vec![0f32; stride];
                Avx2::scores(
                    &q[r * d..(r + 1) * d],
                    d,
                    &k,
                    &offsets,
                    0.125,
                    &mut one,
                    stride,
                );
                assert_eq!(
                    one[..n],
                    all[r * stride..r * stride + n],
                    "scores, row {r} of {rows}"
                );
                let mut o = vec![0.5f32; d];
                Avx2::pv(&mut o, d, &p[r * stride..], stride, &offsets, &k);
                assert_eq!(o, o_all[r * d..(r + 1) * d], "P V, row {r} of {rows}");
                assert!(o.iter().all(|x| x.is_finite()));
            }
        }
    }
}
