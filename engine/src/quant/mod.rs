//! liftoff's own CPU kernels for GGML-quantized matmuls.
//!
//! candle's CPU `vec_dot` for Q4_1 is scalar (SIMD exists only for Q4_0, Q8_0 and the K-quants),
//! and its quantized matmuls run on candle's own thread pool, which competes with rayon for the
//! same cores. SmolLM2's default GGUF is Q4_1 with a Q8_0 LM head, so [`FastQMatMul`] keeps those
//! weights as they are in the file (no extra memory traffic, no re-quantization error) and runs
//! llama.cpp's Q4_1 x Q8_1 and Q8_0 x Q8_0 dot products with AVX2, four weight rows at a time,
//! on rayon; the kernel is picked at run time and other CPUs use a scalar loop with the same
//! integer arithmetic.

mod kernels;

pub use kernels::{quantize_row_q8, BlockQ8};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

/// Weight layouts with an own kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastType {
    Q4_1,
    Q8_0,
}

impl FastType {
    fn block_bytes(self) -> usize {
        match self {
            FastType::Q4_1 => kernels::Q4_1_BYTES,
            FastType::Q8_0 => kernels::Q8_0_BYTES,
        }
    }
}

/// A quantized weight matrix `[n, k]` with a SIMD matmul.
#[derive(Debug)]
pub struct FastQMatMul {
    data: Vec<u8>,
    kind: FastType,
    n: usize,
    k: usize,
    simd: bool,
}

impl FastQMatMul {
    /// Takes over a CPU Q4_1 or Q8_0 tensor; `None` for other types or devices (candle handles
    /// those). `LIFTOFF_DISABLE_FAST_QMATMUL=1` turns the own kernels off.
    pub fn new(q: &QTensor) -> candle_core::Result<Option<Self>> {
        let kind = match q.dtype() {
            GgmlDType::Q4_1 => FastType::Q4_1,
            GgmlDType::Q8_0 => FastType::Q8_0,
            _ => return Ok(None),
        };
        if !q.device().is_cpu()
            || q.shape().rank() != 2
            || std::env::var_os("LIFTOFF_DISABLE_FAST_QMATMUL").is_some()
        {
            return Ok(None);
        }
        let (n, k) = q.shape().dims2()?;
        Ok(Some(Self {
            data: q.data()?.into_owned(),
            kind,
            n,
            k,
            simd: kernels::simd_available(),
        }))
    }

    /// Forces the portable scalar kernel (tests compare the two).
    pub fn with_scalar_kernel(mut self) -> Self {
        self.simd = false;
        self
    }

    /// `x: [m, k] -> [m, n]`, returned in x's dtype.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let (m, k) = x.dims2()?;
        if k != self.k {
            candle_core::bail!(
                "quantized matmul: input has {k} columns, weight has {}",
                self.k
            );
        }
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let bpr = k / kernels::QK;
        let mut acts = vec![BlockQ8::default(); m * bpr];
        for (row, out) in xs.chunks_exact(k).zip(acts.chunks_exact_mut(bpr)) {
            quantize_row_q8(row, out);
        }
        let row_bytes = bpr * self.kind.block_bytes();
        // Rows per task: a few large tasks per thread, in multiples of 4 for the 4-row kernel.
        let threads = rayon::current_num_threads().max(1);
        let rows_per_task = (self.n.div_ceil(threads * 4)).next_multiple_of(4).max(16);
        // out_t is [n, m]: each task owns a contiguous run of weight rows.
        let mut out_t = vec![0f32; self.n * m];
        out_t
            .par_chunks_mut(rows_per_task * m)
            .enumerate()
            .for_each(|(task, chunk)| {
                let r0 = task * rows_per_task;
                let rows = chunk.len() / m;
                let w = &self.data[r0 * row_bytes..(r0 + rows) * row_bytes];
                let act = |a: usize| &acts[a * bpr..(a + 1) * bpr];
                let mut a = 0;
                // Two activation rows at a time share every unpacked weight block.
                while a + 2 <= m {
                    let pair = [act(a), act(a + 1)];
                    let mut r = 0;
                    while r + 4 <= rows {
                        let d = kernels::dot_tile::<4, 2>(
                            self.kind,
                            &w[r * row_bytes..],
                            row_bytes,
                            pair,
                            self.simd,
                        );
                        for (i, v) in d.iter().enumerate() {
                            chunk[(r + i) * m + a] = v[0];
                            chunk[(r + i) * m + a + 1] = v[1];
                        }
                        r += 4;
                    }
                    while r < rows {
                        let d = kernels::dot_tile::<1, 2>(
                            self.kind,
                            &w[r * row_bytes..],
                            row_bytes,
                            pair,
                            self.simd,
                        );
                        chunk[r * m + a] = d[0][0];
                        chunk[r * m + a + 1] = d[0][1];
                        r += 1;
                    }
                    a += 2;
                }
                if a < m {
                    let one = [act(a)];
                    let mut r = 0;
                    while r + 4 <= rows {
                        let d = kernels::dot_tile::<4, 1>(
                            self.kind,
                            &w[r * row_bytes..],
                            row_bytes,
                            one,
                            self.simd,
                        );
                        for (i, v) in d.iter().enumerate() {
                            chunk[(r + i) * m + a] = v[0];
                        }
                        r += 4;
                    }
                    while r < rows {
                        chunk[r * m + a] = kernels::dot_tile::<1, 1>(
                            self.kind,
                            &w[r * row_bytes..],
                            row_bytes,
                            one,
                            self.simd,
                        )[0][0];
                        r += 1;
                    }
                }
            });
        let out = if m == 1 {
            out_t
        } else {
            let mut out = vec![0f32; m * self.n];
            for (r, row) in out_t.chunks_exact(m).enumerate() {
                for (a, v) in row.iter().enumerate() {
                    out[a * self.n + r] = *v;
                }
            }
            out
        };
        Tensor::from_vec(out, (m, self.n), &Device::Cpu)?.to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::Module;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    fn check(dtype: GgmlDType) {
        let (n, k) = (130, 256);
        let w = Tensor::from_vec(random(n * k, 1), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        for m in [1, 2, 5] {
            let x = Tensor::from_vec(random(m * k, 2 + m as u64), (m, k), &Device::Cpu).unwrap();
            let reference = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap())
                .unwrap()
                .forward(&x)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let fast = FastQMatMul::new(&q).unwrap().unwrap();
            let simd = fast.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            let scalar = fast
                .with_scalar_kernel()
                .forward(&x)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for i in 0..m {
                for j in 0..n {
                    // SIMD and scalar run the same integer dot products; only float order differs.
                    assert!(
                        (simd[i][j] - scalar[i][j]).abs() < 1e-4,
                        "{dtype:?} {i},{j}: {} vs {}",
                        simd[i][j],
                        scalar[i][j]
                    );
                    // candle rounds the 8-bit activation scales slightly differently (f16 storage).
                    assert!(
                        (simd[i][j] - reference[i][j]).abs() < 5e-3,
                        "{dtype:?} {i},{j}: {} vs {}",
                        simd[i][j],
                        reference[i][j]
                    );
                }
            }
        }
    }

    #[test]
    fn q4_1_matches_candle() {
        check(GgmlDType::Q4_1);
    }

    #[test]
    fn q8_0_matches_candle() {
        check(GgmlDType::Q8_0);
    }
}
