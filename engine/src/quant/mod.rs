//! liftoff's own CPU kernels for GGML-quantized matmuls that candle runs with scalar code.
//!
//! candle's CPU `vec_dot` for Q4_1 is scalar (SIMD exists only for Q4_0, Q8_0 and the K-quants).
//! SmolLM2's default GGUF is Q4_1, so [`FastQMatMul`] keeps the weights in Q4_1 (no extra
//! memory traffic, no re-quantization error) and runs llama.cpp's Q4_1 x Q8_1 dot product with
//! AVX2, picked at run time; other CPUs fall back to the scalar loop with the same numerics.

mod q4_1;

pub use q4_1::{quantize_row_q8_1, BlockQ8_1};

use crate::error::Result;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

/// Output rows per parallel work item.
const ROWS_PER_TASK: usize = 64;

/// A Q4_1 weight matrix `[n, k]` with a SIMD matmul.
#[derive(Debug)]
pub struct FastQMatMul {
    data: Vec<u8>,
    n: usize,
    k: usize,
    simd: bool,
}

impl FastQMatMul {
    /// Takes over a CPU Q4_1 tensor; `None` for other types or devices (candle handles those).
    pub fn new(q: &QTensor) -> Result<Option<Self>> {
        if q.dtype() != GgmlDType::Q4_1 || !q.device().is_cpu() || q.shape().rank() != 2 {
            return Ok(None);
        }
        if std::env::var_os("LIFTOFF_DISABLE_FAST_Q4_1").is_some() {
            return Ok(None);
        }
        let (n, k) = q.shape().dims2()?;
        Ok(Some(Self {
            data: q.data()?.into_owned(),
            n,
            k,
            simd: q4_1::simd_available(),
        }))
    }

    /// Forces the portable scalar kernel (tests compare the two).
    pub fn with_scalar_kernel(mut self) -> Self {
        self.simd = false;
        self
    }

    /// `x: [m, k] -> [m, n]` (f32 out, any float dtype in, converted back to x's dtype).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let (m, k) = x.dims2()?;
        if k != self.k {
            candle_core::bail!("q4_1 matmul: input has {k} columns, weight has {}", self.k);
        }
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let blocks_per_row = k / q4_1::QK;
        let mut acts = vec![BlockQ8_1::default(); m * blocks_per_row];
        for (row, out) in xs.chunks_exact(k).zip(acts.chunks_exact_mut(blocks_per_row)) {
            quantize_row_q8_1(row, out);
        }
        let mut out = vec![0f32; m * self.n];
        let row_bytes = blocks_per_row * q4_1::BLOCK_BYTES;
        // Work item: a run of weight rows against every activation row, so each weight byte
        // is read once per call and stays in cache across the activation rows.
        let tasks: Vec<usize> = (0..self.n).step_by(ROWS_PER_TASK).collect();
        let results: Vec<(usize, Vec<f32>)> = tasks
            .par_iter()
            .map(|&r0| {
                let r1 = (r0 + ROWS_PER_TASK).min(self.n);
                let mut local = vec![0f32; m * (r1 - r0)];
                for r in r0..r1 {
                    let w = &self.data[r * row_bytes..(r + 1) * row_bytes];
                    for a in 0..m {
                        let act = &acts[a * blocks_per_row..(a + 1) * blocks_per_row];
                        local[a * (r1 - r0) + (r - r0)] = q4_1::vec_dot(w, act, self.simd);
                    }
                }
                (r0, local)
            })
            .collect();
        for (r0, local) in results {
            let width = local.len() / m.max(1);
            for a in 0..m {
                out[a * self.n + r0..a * self.n + r0 + width]
                    .copy_from_slice(&local[a * width..(a + 1) * width]);
            }
        }
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
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn matches_candle_q4_1_matmul() {
        let (m, n, k) = (5, 130, 256);
        let w = Tensor::from_vec(random(n * k, 1), (n, k), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(random(m * k, 2), (m, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let reference = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap())
            .unwrap()
            .forward(&x)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let fast = FastQMatMul::new(&q).unwrap().unwrap();
        let simd = fast.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let scalar = fast.with_scalar_kernel().forward(&x).unwrap().to_vec2::<f32>().unwrap();
        for i in 0..m {
            for j in 0..n {
                // SIMD and scalar run the same integer dot products; only float order differs.
                assert!((simd[i][j] - scalar[i][j]).abs() < 1e-4, "{i},{j}: {} vs {}", simd[i][j], scalar[i][j]);
                // candle rounds the 8-bit activation scales slightly differently (f16 storage).
                assert!((simd[i][j] - reference[i][j]).abs() < 5e-3, "{i},{j}: {} vs {}", simd[i][j], reference[i][j]);
            }
        }
    }
}
