//! Access to the CPU data behind candle storages, for the ops' CPU implementations.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result, Storage, Tensor};

/// The contiguous f32 data `layout` describes in `storage`.
pub(crate) fn cpu_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [f32]> {
    let (start, end) = contiguous(layout, what)?;
    match storage {
        CpuStorage::F32(v) => Ok(&v[start..end]),
        other => bail!("{what}: the CPU kernels take f32, got {:?}", other.dtype()),
    }
}

/// Mutable [`cpu_f32`].
pub(crate) fn cpu_f32_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a mut [f32]> {
    let (start, end) = contiguous(layout, what)?;
    match storage {
        CpuStorage::F32(v) => Ok(&mut v[start..end]),
        other => bail!("{what}: the CPU kernels take f32, got {:?}", other.dtype()),
    }
}

/// Runs `f` on the f32 data of a contiguous CPU tensor in place (an op's non-operand
/// tensors, and the engine's fused CPU steps).
pub fn with_cpu_f32<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (guard, layout) = t.storage_and_layout();
    match &*guard {
        Storage::Cpu(s) => Ok(f(cpu_f32(s, layout, what)?)),
        _ => bail!("{what} must be on the same device as the op's input (the CPU)"),
    }
}

/// Runs `f` on the `T` data of a contiguous CPU tensor in place.
pub(crate) fn with_cpu<T: candle_core::WithDType, R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[T]) -> R,
) -> Result<R> {
    let (guard, layout) = t.storage_and_layout();
    let (start, end) = contiguous(layout, what)?;
    match &*guard {
        Storage::Cpu(s) => Ok(f(&s.as_slice::<T>()?[start..end])),
        _ => bail!("{what} must be on the same device as the op's input (the CPU)"),
    }
}

pub(crate) fn contiguous(layout: &Layout, what: &str) -> Result<(usize, usize)> {
    match layout.contiguous_offsets() {
        Some(o) => Ok(o),
        None => bail!("{what} must be contiguous"),
    }
}
