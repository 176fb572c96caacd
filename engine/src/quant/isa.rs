//! Which instruction set the quantized kernels use, detected at run time.

/// A kernel family; each one computes bit-identical results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust, any CPU.
    Scalar,
    /// AVX2 + FMA + F16C: `vpmaddubsw` products summed in 16 bits.
    Avx2,
    /// AVX-512 VNNI on 256-bit vectors (`vpdpbusd`): 4-way int8 products summed in 32 bits.
    Avx512Vnni,
    /// AMX int8 tiles (`tdpbssd`/`tdpbsud`) for whole tiles of 16 activation rows, AVX-512
    /// VNNI for the rest.
    Amx,
}

impl Isa {
    /// Every family, slowest first.
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni, Isa::Amx];

    /// The name used by `LIFTOFF_CPU_KERNELS` and in logs.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Amx => "amx",
        }
    }

    /// Whether this CPU can run the family.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            let vnni = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni");
            match self {
                Isa::Scalar => true,
                Isa::Avx2 => avx2,
                Isa::Avx512Vnni => vnni,
                Isa::Amx => vnni && super::amx::tiles::usable(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Scalar
        }
    }

    /// The fastest family this CPU has, unless `LIFTOFF_CPU_KERNELS` names another one it has.
    pub fn detect() -> Isa {
        let best = Self::ALL
            .into_iter()
            .rev()
            .find(|i| i.available())
            .unwrap_or(Isa::Scalar);
        match std::env::var("LIFTOFF_CPU_KERNELS") {
            Ok(name) => match Self::ALL.into_iter().find(|i| i.name() == name) {
                Some(isa) if isa.available() => isa,
                _ => {
                    tracing::warn!(
                        "LIFTOFF_CPU_KERNELS={name} is not available here; using {}",
                        best.name()
                    );
                    best
                }
            },
            Err(_) => best,
        }
    }
}
