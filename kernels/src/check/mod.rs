//! Compares the ops on a device with [`reference`](crate::reference) on the same (rounded)
//! inputs: the CPU implementations in the tests, the CUDA kernels with `liftoff kernel-check`
//! on a GPU. Tolerances are per dtype: the reference sees the device's rounded inputs, so what
//! differs is summation order, `__expf` (a few f32 ulp) and the single rounding of the output
//! (values here are within [-1, 1]: half an ulp is 2e-3 in bf16 and 2.4e-4 in f16).

use crate::reference::naive_attention;
use crate::{
    paged_attention, rotary_embedding, write_kv, AttentionShape, HostLayout, PagedLayout,
    RotaryTables, SeqSpan,
};
use candle_core::{DType, Device, Result, Tensor};

mod sampling;

use sampling::check_sampling;
pub use sampling::sampling_specs;

/// One attention test case: `(queries, context)` per sequence.
#[derive(Debug, Clone)]
pub struct AttentionCase {
    pub name: String,
    pub shape: AttentionShape,
    pub block_size: usize,
    pub seqs: Vec<(usize, usize)>,
}

impl AttentionCase {
    /// One query per sequence at the end of contexts of `contexts` keys.
    pub fn decode(
        contexts: &[usize],
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
    ) -> Self {
        let seqs = contexts.iter().map(|&c| (1, c)).collect::<Vec<_>>();
        Self::mixed(&seqs, heads, kv_heads, head_dim, block_size)
    }

    /// Any mix of prompts, chunks over a cached prefix and decode queries.
    pub fn mixed(
        seqs: &[(usize, usize)],
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
    ) -> Self {
        Self {
            name: format!("{seqs:?} h{heads}/{kv_heads} d{head_dim} bs{block_size}"),
            shape: AttentionShape {
                heads,
                kv_heads,
                head_dim,
            },
            block_size,
            seqs: seqs.to_vec(),
        }
    }
}

/// Host data of a case: random q and caches, blocks handed out in a shuffled order.
pub struct CaseData {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub num_blocks: usize,
    pub tables: Vec<Vec<u32>>,
    pub layout: HostLayout,
}

/// A small deterministic generator (values in [-1, 1]).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn uniform(&mut self) -> f32 {
        (self.next() % 2_000_001) as f32 / 1_000_000.0 - 1.0
    }
    fn fill(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform()).collect()
    }
}

/// Random data for `case`.
pub fn random_case(case: &AttentionCase, seed: u64) -> CaseData {
    let mut rng = Lcg(seed);
    let bs = case.block_size;
    let needed: usize = case.seqs.iter().map(|&(_, c)| c.div_ceil(bs)).sum();
    let num_blocks = needed + 3;
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.next() as usize % (i + 1));
    }
    let mut next = ids.into_iter();
    let tables: Vec<Vec<u32>> = case
        .seqs
        .iter()
        .map(|&(_, c)| next.by_ref().take(c.div_ceil(bs)).collect())
        .collect();
    let layout = device_layout(case, &tables, &Device::Cpu)
        .expect("cases are well formed")
        .host()
        .clone();
    let s = case.shape;
    let cache_len = num_blocks * bs * s.kv_heads * s.head_dim;
    CaseData {
        q: rng.fill(layout.num_tokens * s.heads * s.head_dim),
        k: rng.fill(cache_len),
        v: rng.fill(cache_len),
        num_blocks,
        tables,
        layout,
    }
}

/// The outcome of one comparison.
#[derive(Debug, Clone)]
pub struct CheckReport {
    pub op: &'static str,
    pub case: String,
    pub dtype: DType,
    pub max_abs_err: f32,
    pub tolerance: f32,
}

impl CheckReport {
    /// Whether the error is within tolerance (NaN fails).
    pub fn passed(&self) -> bool {
        self.max_abs_err <= self.tolerance
    }
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<4} {:<18} {:<5} max |err| {:.2e} (tolerance {:.0e})  {}",
            if self.passed() { "ok" } else { "FAIL" },
            self.op,
            format!("{:?}", self.dtype).to_lowercase(),
            self.max_abs_err,
            self.tolerance,
            self.case
        )
    }
}

fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 1e-2,
        DType::F16 => 2e-3,
        _ => 1e-4,
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        // f32::max drops NaN: once a NaN is seen the result stays NaN (and fails the check).
        .fold(0.0, |m: f32, d| {
            if m.is_nan() || d.is_nan() {
                f32::NAN
            } else {
                m.max(d)
            }
        })
}

/// `data` as a `dtype` tensor on `device`, and the rounded values back on the host.
fn upload(
    data: &[f32],
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Vec<f32>)> {
    let t = Tensor::from_slice(data, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?;
    let rounded = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok((t, rounded))
}

fn to_host(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// The attention cases: short and split-K decode, prompts (head dims 64, 128, 256), chunked
/// prefill over a cached prefix, and decode and prefill in one batch.
pub fn attention_cases() -> Vec<AttentionCase> {
    vec![
        AttentionCase::decode(&[1, 17, 200, 512], 8, 2, 64, 16),
        AttentionCase::decode(&[513, 1500, 3000, 40], 8, 8, 128, 16),
        AttentionCase::mixed(&[(37, 37), (5, 5)], 4, 2, 64, 16),
        AttentionCase::mixed(&[(70, 70), (20, 50)], 4, 1, 128, 16),
        AttentionCase::mixed(&[(33, 33)], 2, 2, 256, 16),
        AttentionCase::mixed(&[(1, 90), (40, 40), (1, 600), (17, 30)], 8, 4, 64, 8),
    ]
}

/// Runs every check on `device` in every dtype it supports (f32 on the CPU; f32, f16 and bf16
/// on a GPU).
pub fn run(device: &Device) -> Result<Vec<CheckReport>> {
    let dtypes: &[DType] = if device.is_cpu() {
        &[DType::F32]
    } else {
        &[DType::F32, DType::F16, DType::BF16]
    };
    let mut reports = Vec::new();
    for &dtype in dtypes {
        for (i, case) in attention_cases().iter().enumerate() {
            reports.push(check_attention(case, 100 + i as u64, dtype, dtype, device)?);
        }
        let case = AttentionCase::mixed(&[(9, 20), (1, 7), (30, 30)], 4, 2, 64, 16);
        reports.push(check_write_kv(&case, dtype, dtype, device)?);
        for interleaved in [false, true] {
            reports.push(check_rotary(&case, interleaved, dtype, device)?);
        }
    }
    if device.is_cpu() {
        // The CPU's f16 KV cache: f32 queries and rows, f16 storage.
        for (i, case) in attention_cases().iter().enumerate() {
            reports.push(check_attention(
                case,
                100 + i as u64,
                DType::F32,
                DType::F16,
                device,
            )?);
        }
        let case = AttentionCase::mixed(&[(9, 20), (1, 7), (30, 30)], 4, 2, 64, 16);
        reports.push(check_write_kv(&case, DType::F32, DType::F16, device)?);
    }
    reports.push(check_sampling(device)?);
    Ok(reports)
}

/// The case's sequences over `tables`, as a layout for `device`.
fn device_layout(
    case: &AttentionCase,
    tables: &[Vec<u32>],
    device: &Device,
) -> Result<PagedLayout> {
    let mut start = 0;
    let spans: Vec<SeqSpan> = case
        .seqs
        .iter()
        .zip(tables)
        .map(|(&(query_len, context_len), t)| {
            let span = SeqSpan {
                query_start: start,
                query_len,
                context_len,
                block_table: t,
            };
            start += query_len;
            span
        })
        .collect();
    PagedLayout::new(&spans, case.block_size, device)
}

/// Attention of `dtype` queries over `cache_dtype` caches against the reference on the same
/// rounded values.
fn check_attention(
    case: &AttentionCase,
    seed: u64,
    dtype: DType,
    cache_dtype: DType,
    device: &Device,
) -> Result<CheckReport> {
    let data = random_case(case, seed);
    let s = case.shape;
    let cache_shape = [data.num_blocks, case.block_size, s.kv_heads, s.head_dim];
    let (q, qh) = upload(
        &data.q,
        &[data.layout.num_tokens, s.heads, s.head_dim],
        dtype,
        device,
    )?;
    let (k, kh) = upload(&data.k, &cache_shape, cache_dtype, device)?;
    let (v, vh) = upload(&data.v, &cache_shape, cache_dtype, device)?;
    let layout = device_layout(case, &data.tables, device)?;
    let got = to_host(&paged_attention(&q, &k, &v, &layout, s)?)?;
    let want = naive_attention(&qh, &kh, &vh, &data.layout, s);
    Ok(CheckReport {
        op: if data.layout.is_decode() {
            "paged-decode"
        } else {
            "paged-prefill"
        },
        case: cache_note(&case.name, dtype, cache_dtype),
        dtype,
        max_abs_err: max_diff(&got, &want),
        tolerance: tolerance(dtype),
    })
}

fn cache_note(name: &str, dtype: DType, cache_dtype: DType) -> String {
    if dtype == cache_dtype {
        name.to_string()
    } else {
        format!(
            "{name} ({} cache)",
            format!("{cache_dtype:?}").to_lowercase()
        )
    }
}

/// `dtype` rows written into a `cache_dtype` cache: the cache must hold exactly the rows
/// rounded to its dtype at their slots, and its old values everywhere else.
fn check_write_kv(
    case: &AttentionCase,
    dtype: DType,
    cache_dtype: DType,
    device: &Device,
) -> Result<CheckReport> {
    let data = random_case(case, 7);
    let s = case.shape;
    let cache_shape = [data.num_blocks, case.block_size, s.kv_heads, s.head_dim];
    let (cache, mut want) = upload(&data.k, &cache_shape, cache_dtype, device)?;
    let n = data.layout.num_tokens;
    let (rows, rows_h) = upload(
        &data.v[..n * s.kv_heads * s.head_dim],
        &[n, s.kv_heads, s.head_dim],
        dtype,
        device,
    )?;
    let layout = device_layout(case, &data.tables, device)?;
    write_kv(&cache, &rows, &layout)?;
    // Written out here by block, offset, head and element (not with `reference::write_kv`,
    // which the CPU op uses).
    let new = to_host(&rows.to_dtype(cache_dtype)?)?;
    let (bs, kvh, d) = (case.block_size, s.kv_heads, s.head_dim);
    for (t, &slot) in data.layout.slots.iter().enumerate() {
        let (block, offset) = (slot as usize / bs, slot as usize % bs);
        for h in 0..kvh {
            for e in 0..d {
                want[((block * bs + offset) * kvh + h) * d + e] = new[(t * kvh + h) * d + e];
            }
        }
    }
    debug_assert!(dtype != cache_dtype || new == rows_h);
    Ok(CheckReport {
        op: "write-kv",
        case: cache_note(&case.name, dtype, cache_dtype),
        dtype,
        max_abs_err: max_diff(&to_host(&cache)?, &want),
        tolerance: 0.0,
    })
}

fn check_rotary(
    case: &AttentionCase,
    interleaved: bool,
    dtype: DType,
    device: &Device,
) -> Result<CheckReport> {
    let data = random_case(case, 9);
    let s = case.shape;
    let half = s.head_dim / 2;
    let max_pos = data.layout.max_context_len;
    let angles: Vec<f32> = (0..max_pos * half)
        .map(|i| (i / half) as f32 * 10000f32.powf(-2.0 * (i % half) as f32 / s.head_dim as f32))
        .collect();
    let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
    let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
    let tables = RotaryTables::new(&cos, &sin, half, interleaved, device)?;
    let n = data.layout.num_tokens;
    let (x, mut want) = upload(&data.q, &[n, s.heads, s.head_dim], dtype, device)?;
    let layout = device_layout(case, &data.tables, device)?;
    rotary_embedding(&x, &tables, &layout)?;
    // Each element from its own formula, in f64 (not with `reference::rotary`, which the CPU
    // op uses): element e pairs with e ± 1 (interleaved) or e ± half, with angle index j.
    let d = s.head_dim;
    let input = want.clone();
    for (t, &p) in data.layout.positions.iter().enumerate() {
        for h in 0..s.heads {
            let at = (t * s.heads + h) * d;
            for e in 0..d {
                let (j, first) = if interleaved {
                    (e / 2, e % 2 == 0)
                } else {
                    (e % half, e < half)
                };
                let partner = if interleaved { e ^ 1 } else { (e + half) % d };
                let (c, sn) = (
                    cos[p as usize * half + j] as f64,
                    sin[p as usize * half + j] as f64,
                );
                let (x, y) = (input[at + e] as f64, input[at + partner] as f64);
                // (x + iy)(c + is) for the first of a pair, its conjugate pairing for the second.
                want[at + e] = if first {
                    x * c - y * sn
                } else {
                    x * c + y * sn
                } as f32;
            }
        }
    }
    Ok(CheckReport {
        op: if interleaved {
            "rotary-interleaved"
        } else {
            "rotary"
        },
        case: case.name.clone(),
        dtype,
        max_abs_err: max_diff(&to_host(&x)?, &want),
        tolerance: tolerance(dtype),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ops_match_the_reference() {
        let reports = run(&Device::Cpu).unwrap();
        assert!(reports.len() >= 10);
        for r in &reports {
            assert!(r.passed(), "{r}");
        }
    }

    #[test]
    fn max_diff_keeps_nan() {
        assert!(max_diff(&[f32::NAN, 1.0], &[0.0, 1.0]).is_nan());
        assert!(max_diff(&[1.0, f32::NAN], &[1.0, 0.0]).is_nan());
        assert_eq!(max_diff(&[1.0, 2.0], &[1.5, 2.0]), 0.5);
    }

    /// Head dims that are not a multiple of 32 (the CPU kernels' vector loops have a tail),
    /// decode and prefill; CPU only (the GPU kernels take 64, 128 and 256).
    #[test]
    fn cpu_attention_handles_odd_head_dims() {
        for (i, d) in [40, 72, 8].into_iter().enumerate() {
            for case in [
                AttentionCase::decode(&[1, 33, 300], 6, 2, d, 16),
                AttentionCase::mixed(&[(37, 37), (1, 50), (20, 60)], 4, 1, d, 8),
            ] {
                for cache in [DType::F32, DType::F16] {
                    let seed = 500 + i as u64;
                    let r = check_attention(&case, seed, DType::F32, cache, &Device::Cpu).unwrap();
                    assert!(r.passed(), "head dim {d}: {r}");
                }
            }
        }
    }

    /// The kernels against the reference on GPU 0 (run with `--features cuda` on a machine
    /// with a GPU, or `liftoff kernel-check` where there is no Rust toolchain).
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_kernels_match_the_reference() {
        let device = Device::new_cuda(0).expect("a CUDA device (this test needs a GPU)");
        for r in run(&device).unwrap() {
            assert!(r.passed(), "{r}");
        }
    }

    #[test]
    fn a_wrong_kernel_fails_the_check() {
        let case = &attention_cases()[2];
        let data = random_case(case, 1);
        let right = naive_attention(&data.q, &data.k, &data.v, &data.layout, case.shape);
        // Keys read from the wrong head: the check must see it.
        let mut shifted = data.k.clone();
        shifted.rotate_left(case.shape.head_dim);
        let wrong = naive_attention(&data.q, &shifted, &data.v, &data.layout, case.shape);
        assert!(max_diff(&right, &wrong) > 1e-2);
    }
}
