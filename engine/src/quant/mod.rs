//! liftoff's own CPU kernels for GGML-quantized matmuls: an int8 GEMM.
//!
//! candle's CPU `vec_dot` for Q4_1 is scalar and its quantized matmuls run on candle's own
//! thread pool, which competes with rayon for the same cores. SmolLM2's default GGUF is Q4_1
//! with a Q8_0 LM head, so [`FastQMatMul`] repacks those weights at load time into panels of
//! 8 rows ([`packed`]), quantizes the activations once per matmul ([`activation`]) and runs
//! register-blocked micro-kernels (8 weight rows x 4 activation rows, [`microkernel`]) split
//! over the rayon pool by output rows ([`gemm`]). The instruction set is chosen at run time
//! ([`Isa`]: AMX tiles, AVX-512 VNNI, AVX2, or portable Rust); all of them equal the integer reference
//! ([`reference`]) bit for bit.

pub mod activation;
mod amx;
pub mod gemm;
pub mod isa;
pub mod limits;
mod microkernel;
pub mod packed;
pub mod reference;

pub use activation::{quantize_row_q8, quantize_rows, BlockQ8};
pub use isa::Isa;
pub use packed::{PackedMatrix, WeightKind};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

/// A quantized weight matrix `[n, k]` with liftoff's int8 GEMM.
#[derive(Debug)]
pub struct FastQMatMul {
    packed: PackedMatrix,
    isa: Isa,
}

impl FastQMatMul {
    /// Bytes of the packed weight.
    pub fn bytes(&self) -> usize {
        self.packed.bytes()
    }

    /// Takes over a CPU Q4_1 or Q8_0 tensor; `None` for other types or devices (candle handles
    /// those). `LIFTOFF_DISABLE_FAST_QMATMUL=1` turns the own kernels off.
    pub fn new(q: &QTensor) -> candle_core::Result<Option<Self>> {
        let kind = match q.dtype() {
            GgmlDType::Q4_1 => WeightKind::Q4_1,
            GgmlDType::Q8_0 => WeightKind::Q8_0,
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
            packed: PackedMatrix::pack(kind, &q.data()?, n, k),
            isa: Isa::detect(),
        }))
    }

    /// Runs the given kernel family instead of the detected one (tests and benchmarks).
    pub fn with_isa(mut self, isa: Isa) -> Self {
        self.isa = isa;
        self
    }

    /// The kernel family in use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// `x: [m, k] -> [m, n]`, returned in x's dtype.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let (m, k) = x.dims2()?;
        if k != self.packed.k() {
            candle_core::bail!(
                "quantized matmul: input has {k} columns, weight has {}",
                self.packed.k()
            );
        }
        // Quantized straight from the input's storage (no f32 copy of the activations).
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let acts =
            liftoff_kernels::with_cpu_f32(&x, "quantized matmul input", |xs| quantize_rows(xs, k))?;
        let out = gemm::gemm(&self.packed, &acts, m, self.isa);
        Tensor::from_vec(out, (m, self.packed.n()), &Device::Cpu)?.to_dtype(dtype)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::Module;

    /// `n` values in [-0.5, 0.5), a fixed LCG per seed (shared by the CPU kernels' tests).
    pub(crate) fn random(n: usize, seed: u64) -> Vec<f32> {
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

    /// candle's own quantized matmul is an independent implementation of the same numerics
    /// (it rounds the 8-bit activation scales slightly differently), so this catches a packing
    /// or indexing mistake that the bit-exact tests, which share the definition, could not.
    fn check(dtype: GgmlDType) {
        let (n, k) = (130, 256);
        let w = Tensor::from_vec(random(n * k, 1), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        for m in [1, 2, 5, 9] {
            let x = Tensor::from_vec(random(m * k, 2 + m as u64), (m, k), &Device::Cpu).unwrap();
            let reference = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap())
                .unwrap()
                .forward(&x)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let fast = FastQMatMul::new(&q).unwrap().unwrap();
            let got = fast.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            for i in 0..m {
                for j in 0..n {
                    let (a, b) = (got[i][j], reference[i][j]);
                    assert!(
                        a.is_finite() && (a - b).abs() < 5e-3,
                        "{dtype:?} {i},{j}: {a} vs candle {b}"
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
