//! AMX tile registers behind a small interface: the hardware, through inline assembly (Rust's
//! AMX intrinsics are not stable), and in tests a model of the instructions written from
//! Intel's pseudocode, so that the kernel's layouts are checked on machines without AMX too.
//!
//! The kernel keeps several blocks in flight: four accumulators `C[c]` (tmm0-3: 16 activation
//! rows x 16 int32) and two sets of operands, `A[s]` (tmm4/5: 16 activation rows x 32 signed
//! bytes, one block) and `B[s]` (tmm6/7: 8 rows x 64 bytes, row `k` holding bytes `4k..4k+4` of
//! each of 16 weight rows). Accumulator `c` always takes its operands from set `c % 2`.

/// Rows of an activation tile and weight rows of a B tile.
pub const TILE: usize = 16;

/// Bytes of one B tile (8 rows of 64 bytes).
pub const B_BYTES: usize = 512;

/// Accumulators, and the operand sets they take from (`c % 2`).
pub const ACCUMULATORS: usize = 4;

/// The tile operations the kernel needs; `c` (0..4) picks an accumulator, `s` (0 or 1) a set
/// of operands.
pub trait Tiles {
    /// `C[c] = 0`.
    ///
    /// # Safety
    /// The tiles must be configured (hardware).
    unsafe fn zero_c(&mut self, c: usize);
    /// `A[s]` = 16 rows of 32 bytes, row `r` at `src + r * stride`.
    ///
    /// # Safety
    /// Every row must be readable.
    unsafe fn load_a(&mut self, s: usize, src: *const u8, stride: usize);
    /// `B[s]` = the 512 bytes at `src`.
    ///
    /// # Safety
    /// `src` must hold [`B_BYTES`] readable bytes.
    unsafe fn load_b(&mut self, s: usize, src: *const u8);
    /// `C[c] += A[c % 2] · B[c % 2]`: signed activation bytes against signed (`tdpbssd`) or
    /// unsigned (`tdpbsud`) weight bytes.
    ///
    /// # Safety
    /// The tiles must be configured (hardware).
    unsafe fn dot(&mut self, c: usize, unsigned_b: bool);
    /// Stores `C[c]` as 16 rows of 16 `i32` at `dst`.
    ///
    /// # Safety
    /// `dst` must hold 256 writable `i32`.
    unsafe fn store_c(&mut self, c: usize, dst: *mut i32);
}

/// Whether this CPU has AMX-TILE and AMX-INT8 and the kernel lets this process use them
/// (Linux asks each process to request the tile state, `ARCH_REQ_XCOMP_PERM`). Asked once.
pub fn usable() -> bool {
    static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USABLE.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            if std::arch::x86_64::__cpuid(0).eax < 7 {
                return false;
            }
            let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
            let (tile, int8) = (leaf7.edx & (1 << 24) != 0, leaf7.edx & (1 << 25) != 0);
            if !(tile && int8) {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call with integer arguments.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            };
            if rc != 0 {
                tracing::warn!(
                    "the CPU has AMX but the kernel refused its tile state ({}); using AVX-512",
                    std::io::Error::last_os_error()
                );
            }
            rc == 0
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        false
    })
}

#[cfg(target_arch = "x86_64")]
pub use hardware::Amx;

#[cfg(target_arch = "x86_64")]
mod hardware {
    use super::{Tiles, TILE};
    use std::arch::asm;

    /// The palette-1 configuration of the six tiles (64 bytes, as `ldtilecfg` reads it).
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    impl Config {
        fn kernel() -> Self {
            let mut c = Config {
                palette: 1,
                start_row: 0,
                reserved: [0; 14],
                colsb: [0; 16],
                rows: [0; 16],
            };
            for t in 0..4 {
                (c.rows[t], c.colsb[t]) = (TILE as u8, 64); // C
            }
            for s in 0..2 {
                (c.rows[4 + s], c.colsb[4 + s]) = (TILE as u8, 32); // A: one block
                (c.rows[6 + s], c.colsb[6 + s]) = (8, 64); // B: 32 bytes / 4 rows
            }
            c
        }
    }

    /// The configured tiles of the running thread; released when dropped.
    pub struct Amx(());

    impl Amx {
        /// Configures the tiles for the kernel.
        ///
        /// # Safety
        /// [`super::usable`] must have returned true; the value must stay on this thread.
        pub unsafe fn configure() -> Self {
            let cfg = Config::kernel();
            asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly));
            Amx(())
        }
    }

    impl Drop for Amx {
        fn drop(&mut self) {
            // SAFETY: the tiles were configured by `configure`.
            unsafe { asm!("tilerelease", options(nostack, nomem)) }
        }
    }

    impl Tiles for Amx {
        #[inline(always)]
        unsafe fn zero_c(&mut self, c: usize) {
            match c {
                0 => asm!("tilezero tmm0", options(nostack, nomem)),
                1 => asm!("tilezero tmm1", options(nostack, nomem)),
                2 => asm!("tilezero tmm2", options(nostack, nomem)),
                _ => asm!("tilezero tmm3", options(nostack, nomem)),
            }
        }

        #[inline(always)]
        unsafe fn load_a(&mut self, s: usize, src: *const u8, stride: usize) {
            if s == 0 {
                asm!("tileloadd tmm4, [{p} + {s}*1]", p = in(reg) src, s = in(reg) stride,
                    options(nostack, readonly));
            } else {
                asm!("tileloadd tmm5, [{p} + {s}*1]", p = in(reg) src, s = in(reg) stride,
                    options(nostack, readonly));
            }
        }

        #[inline(always)]
        unsafe fn load_b(&mut self, s: usize, src: *const u8) {
            if s == 0 {
                asm!("tileloadd tmm6, [{p} + {s}*1]", p = in(reg) src, s = in(reg) 64usize,
                    options(nostack, readonly));
            } else {
                asm!("tileloadd tmm7, [{p} + {s}*1]", p = in(reg) src, s = in(reg) 64usize,
                    options(nostack, readonly));
            }
        }

        #[inline(always)]
        unsafe fn dot(&mut self, c: usize, unsigned_b: bool) {
            match (c, unsigned_b) {
                (0, false) => asm!("tdpbssd tmm0, tmm4, tmm6", options(nostack, nomem)),
                (0, true) => asm!("tdpbsud tmm0, tmm4, tmm6", options(nostack, nomem)),
                (1, false) => asm!("tdpbssd tmm1, tmm5, tmm7", options(nostack, nomem)),
                (1, true) => asm!("tdpbsud tmm1, tmm5, tmm7", options(nostack, nomem)),
                (2, false) => asm!("tdpbssd tmm2, tmm4, tmm6", options(nostack, nomem)),
                (2, true) => asm!("tdpbsud tmm2, tmm4, tmm6", options(nostack, nomem)),
                (_, false) => asm!("tdpbssd tmm3, tmm5, tmm7", options(nostack, nomem)),
                (_, true) => asm!("tdpbsud tmm3, tmm5, tmm7", options(nostack, nomem)),
            }
        }

        #[inline(always)]
        unsafe fn store_c(&mut self, c: usize, dst: *mut i32) {
            match c {
                0 => asm!("tilestored [{p} + {s}*1], tmm0", p = in(reg) dst, s = in(reg) 64usize,
                    options(nostack)),
                1 => asm!("tilestored [{p} + {s}*1], tmm1", p = in(reg) dst, s = in(reg) 64usize,
                    options(nostack)),
                2 => asm!("tilestored [{p} + {s}*1], tmm2", p = in(reg) dst, s = in(reg) 64usize,
                    options(nostack)),
                _ => asm!("tilestored [{p} + {s}*1], tmm3", p = in(reg) dst, s = in(reg) 64usize,
                    options(nostack)),
            }
        }
    }

    /// Int8 multiply-adds done by `iters` rounds of four `tdpbssd` on full 16 x 64-byte tiles
    /// (a register-only loop for `liftoff bench limits`).
    ///
    /// # Safety
    /// [`super::usable`] must have returned true.
    pub unsafe fn peak_loop(iters: u64) -> u64 {
        let mut cfg = Config::kernel();
        for t in 0..8 {
            (cfg.rows[t], cfg.colsb[t]) = (TILE as u8, 64);
        }
        asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly));
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "tilezero tmm4",
            "tilezero tmm5",
            options(nostack, nomem)
        );
        for _ in 0..iters {
            asm!(
                "tdpbssd tmm0, tmm4, tmm5",
                "tdpbssd tmm1, tmm4, tmm5",
                "tdpbssd tmm2, tmm4, tmm5",
                "tdpbssd tmm3, tmm4, tmm5",
                options(nostack, nomem)
            );
        }
        asm!("tilerelease", options(nostack, nomem));
        iters * 4 * (TILE * TILE * 64) as u64
    }
}

#[cfg(target_arch = "x86_64")]
pub use hardware::peak_loop;

/// The instructions as Intel's pseudocode defines them, on tiles in memory (tests only).
#[cfg(test)]
pub struct Model {
    c: [[i32; TILE * TILE]; ACCUMULATORS],
    a: [[i8; TILE * 32]; 2],
    b: [[u8; B_BYTES]; 2],
}

#[cfg(test)]
impl Model {
    pub fn new() -> Self {
        Model {
            c: [[0; TILE * TILE]; ACCUMULATORS],
            a: [[0; TILE * 32]; 2],
            b: [[0; B_BYTES]; 2],
        }
    }
}

#[cfg(test)]
impl Tiles for Model {
    unsafe fn zero_c(&mut self, c: usize) {
        self.c[c] = [0; TILE * TILE];
    }

    unsafe fn load_a(&mut self, s: usize, src: *const u8, stride: usize) {
        for r in 0..TILE {
            for i in 0..32 {
                self.a[s][r * 32 + i] = *src.add(r * stride + i) as i8;
            }
        }
    }

    unsafe fn load_b(&mut self, s: usize, src: *const u8) {
        self.b[s].copy_from_slice(std::slice::from_raw_parts(src, B_BYTES));
    }

    unsafe fn dot(&mut self, c: usize, unsigned_b: bool) {
        let s = c % 2;
        // for m < C.rows, k < A.colsb / 4, n < C.colsb / 4:
        //     C[m].dword[n] += sum over i < 4 of A[m].byte[4k + i] * B[k].byte[4n + i]
        for m in 0..TILE {
            for k in 0..8 {
                for n in 0..TILE {
                    let mut sum = 0i32;
                    for i in 0..4 {
                        let b = self.b[s][k * 64 + 4 * n + i];
                        let b = if unsigned_b { b as i32 } else { b as i8 as i32 };
                        sum += self.a[s][m * 32 + 4 * k + i] as i32 * b;
                    }
                    self.c[c][m * TILE + n] = self.c[c][m * TILE + n].wrapping_add(sum);
                }
            }
        }
    }

    unsafe fn store_c(&mut self, c: usize, dst: *mut i32) {
        std::ptr::copy_nonoverlapping(self.c[c].as_ptr(), dst, TILE * TILE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_signs_bytes_as_the_instructions_do() {
        // Activations -1 against weight bytes 0xFF: tdpbsud reads 255, tdpbssd reads -1.
        let a = [0xFFu8; TILE * 32];
        let b = [0xFFu8; B_BYTES];
        let mut out = [0i32; TILE * TILE];
        let mut m = Model::new();
        unsafe {
            m.zero_c(1);
            m.load_a(1, a.as_ptr(), 32);
            m.load_b(1, b.as_ptr());
            m.dot(1, true);
            m.store_c(1, out.as_mut_ptr());
        }
        assert!(out.iter().all(|&v| v == -255 * 32), "{:?}", &out[..4]);
        unsafe {
            m.dot(1, false);
            m.store_c(1, out.as_mut_ptr());
        }
        assert!(out.iter().all(|&v| v == -255 * 32 + 32), "{:?}", &out[..4]);
    }
}
