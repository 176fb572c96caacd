//! Launches of the CUDA kernels in `cuda/*.cu` (PTX embedded at build time, sm_80 and sm_90).

use crate::attention::PagedAttention;
use crate::storage::contiguous;
use crate::{
    PagedLayout, RotaryTables, DECODE_PARTITION, MAX_HEAD_DIM, PREFILL_TILE_K, PREFILL_TILE_Q,
};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, Storage, WithDType};

const ATTENTION_SM80: &str = include_str!(concat!(env!("OUT_DIR"), "/attention_sm80.ptx"));
const ATTENTION_SM90: &str = include_str!(concat!(env!("OUT_DIR"), "/attention_sm90.ptx"));
const CACHE_SM80: &str = include_str!(concat!(env!("OUT_DIR"), "/cache_sm80.ptx"));
const CACHE_SM90: &str = include_str!(concat!(env!("OUT_DIR"), "/cache_sm90.ptx"));

/// Threads of the decode and prefill CTAs (the kernels assume these).
const DECODE_THREADS: u32 = 128;
const DECODE_WARPS: usize = 4;
const PREFILL_THREADS: u32 = 128;
/// Dynamic shared memory a kernel gets without opting in.
const DEFAULT_SMEM: usize = 48 * 1024;

#[derive(Clone, Copy)]
enum Source {
    Attention,
    Cache,
}

/// `kernel` from the PTX built for this device's architecture.
fn function(dev: &CudaDevice, source: Source, kernel: &str) -> Result<CudaFunction> {
    let (major, minor) = dev.cuda_stream().context().compute_capability().w()?;
    if major < 8 {
        bail!("liftoff's CUDA kernels need compute capability 8.0 or newer, this GPU has {major}.{minor}");
    }
    let hopper = major >= 9;
    let (ptx, module) = match (source, hopper) {
        (Source::Attention, false) => (ATTENTION_SM80, "liftoff_attention_sm80"),
        (Source::Attention, true) => (ATTENTION_SM90, "liftoff_attention_sm90"),
        (Source::Cache, false) => (CACHE_SM80, "liftoff_cache_sm80"),
        (Source::Cache, true) => (CACHE_SM90, "liftoff_cache_sm90"),
    };
    Ok(dev
        .get_or_load_custom_func(kernel, module, ptx)?
        .into_cuda_function())
}

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("liftoff's CUDA kernels take f32, f16 or bf16, not {other:?}"),
    })
}

/// The contiguous device data of a tensor an op holds (read-locked by `guard`).
fn view<'a, T: CudaDType>(
    storage: &'a Storage,
    layout: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let (start, end) = contiguous(layout, what)?;
    match storage {
        Storage::Cuda(s) => Ok(s.as_cuda_slice::<T>()?.slice(start..end)),
        _ => bail!("{what} must be on the GPU"),
    }
}

macro_rules! dispatch {
    ($dtype:expr, $f:ident ( $($arg:expr),* )) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F16 => $f::<half::f16>($($arg),*),
            DType::BF16 => $f::<half::bf16>($($arg),*),
            other => bail!("liftoff's CUDA kernels take f32, f16 or bf16, not {other:?}"),
        }
    };
}

pub(crate) fn write_kv(
    cache: &mut CudaStorage,
    cl: &Layout,
    src: &CudaStorage,
    sl: &Layout,
    layout: &PagedLayout,
) -> Result<()> {
    dispatch!(cache.dtype(), write_kv_t(cache, cl, src, sl, layout))
}

fn write_kv_t<T: CudaDType + DeviceRepr + WithDType + ValidAsZeroBits>(
    cache: &mut CudaStorage,
    cl: &Layout,
    src: &CudaStorage,
    sl: &Layout,
    layout: &PagedLayout,
) -> Result<()> {
    let dev = cache.device().clone();
    let stream = dev.cuda_stream();
    let (c0, c1) = contiguous(cl, "cache")?;
    let (s0, s1) = contiguous(sl, "new rows")?;
    let row = sl.dims()[1] * sl.dims()[2];
    let tokens = sl.dims()[0];
    let (slots_g, slots_l) = layout.tensors()?.slots.storage_and_layout();
    let slots = view::<u32>(&slots_g, slots_l, "slots")?;
    let func = function(
        &dev,
        Source::Cache,
        &format!("write_kv_{}", suffix(T::DTYPE)?),
    )?;
    let src = src.as_cuda_slice::<T>()?.slice(s0..s1);
    let mut dst = cache.as_cuda_slice_mut::<T>()?.slice_mut(c0..c1);
    let cfg = LaunchConfig {
        grid_dim: (tokens as u32, 1, 1),
        block_dim: (row.clamp(32, 512) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let row = row as i32;
    let mut b = stream.launch_builder(&func);
    b.arg(&mut dst);
    b.arg(&src);
    b.arg(&slots);
    b.arg(&row);
    // SAFETY: the arguments match the kernel's signature; slots were checked against the
    // cache's block count when the op was built.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

pub(crate) fn rotary(
    x: &mut CudaStorage,
    xl: &Layout,
    tables: &RotaryTables,
    layout: &PagedLayout,
) -> Result<()> {
    dispatch!(x.dtype(), rotary_t(x, xl, tables, layout))
}

fn rotary_t<T: CudaDType + DeviceRepr + WithDType + ValidAsZeroBits>(
    x: &mut CudaStorage,
    xl: &Layout,
    tables: &RotaryTables,
    layout: &PagedLayout,
) -> Result<()> {
    let dev = x.device().clone();
    let stream = dev.cuda_stream();
    let (x0, x1) = contiguous(xl, "rotary input")?;
    let (tokens, heads) = (xl.dims()[0], xl.dims()[1]);
    let (cos_t, sin_t, interleaved) = tables.parts();
    let (cos_g, cos_l) = cos_t.storage_and_layout();
    let (sin_g, sin_l) = sin_t.storage_and_layout();
    let (pos_g, pos_l) = layout.tensors()?.positions.storage_and_layout();
    let cos = view::<f32>(&cos_g, cos_l, "cos table")?;
    let sin = view::<f32>(&sin_g, sin_l, "sin table")?;
    let positions = view::<u32>(&pos_g, pos_l, "positions")?;
    let func = function(
        &dev,
        Source::Cache,
        &format!("rotary_{}", suffix(T::DTYPE)?),
    )?;
    let mut xs = x.as_cuda_slice_mut::<T>()?.slice_mut(x0..x1);
    let half = tables.half();
    let cfg = LaunchConfig {
        grid_dim: (tokens as u32, 1, 1),
        block_dim: ((heads * half).clamp(32, 512) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (heads, half, interleaved) = (heads as i32, half as i32, interleaved as i32);
    let mut b = stream.launch_builder(&func);
    b.arg(&mut xs);
    b.arg(&positions);
    b.arg(&cos);
    b.arg(&sin);
    b.arg(&heads);
    b.arg(&half);
    b.arg(&interleaved);
    // SAFETY: the arguments match the kernel's signature; positions are within the tables.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

pub(crate) fn paged_attention(
    q: &CudaStorage,
    ql: &Layout,
    op: &PagedAttention,
) -> Result<(CudaStorage, Shape)> {
    if op.shape.head_dim > MAX_HEAD_DIM {
        bail!(
            "the CUDA attention kernels take head_dim up to {MAX_HEAD_DIM}, not {}",
            op.shape.head_dim
        );
    }
    dispatch!(q.dtype(), attention_t(q, ql, op))
}

fn attention_t<T: CudaDType + DeviceRepr + WithDType + ValidAsZeroBits>(
    q: &CudaStorage,
    ql: &Layout,
    op: &PagedAttention,
) -> Result<(CudaStorage, Shape)> {
    let dev = q.device().clone();
    let stream = dev.cuda_stream();
    let host = op.layout.host();
    let s = op.shape;
    let (q0, q1) = contiguous(ql, "q")?;
    let q_view = q.as_cuda_slice::<T>()?.slice(q0..q1);
    let (k_g, k_l) = op.k_cache.storage_and_layout();
    let (v_g, v_l) = op.v_cache.storage_and_layout();
    let k = view::<T>(&k_g, k_l, "k_cache")?;
    let v = view::<T>(&v_g, v_l, "v_cache")?;
    let tensors = op.layout.tensors()?;
    let (bt_g, bt_l) = tensors.block_tables.storage_and_layout();
    let (qs_g, qs_l) = tensors.query_starts.storage_and_layout();
    let (cl_g, cl_l) = tensors.context_lens.storage_and_layout();
    let block_tables = view::<u32>(&bt_g, bt_l, "block tables")?;
    let query_starts = view::<u32>(&qs_g, qs_l, "query starts")?;
    let context_lens = view::<u32>(&cl_g, cl_l, "context lengths")?;
    let mut out = dev.alloc_zeros::<T>(q1 - q0)?;
    let sfx = suffix(T::DTYPE)?;
    let (heads, kv_heads, head_dim) = (s.heads as i32, s.kv_heads as i32, s.head_dim as i32);
    let (block_size, max_blocks) = (host.block_size as i32, host.max_blocks as i32);
    let scale = 1f32 / (s.head_dim as f32).sqrt();
    let seqs = host.num_seqs() as u32;
    if host.num_tokens == 0 {
        return Ok((CudaStorage::wrap_cuda_slice(out, dev), ql.shape().clone()));
    }

    if host.is_decode() {
        let partition = DECODE_PARTITION;
        let parts = host.max_context_len.div_ceil(partition).max(1);
        let func = function(&dev, Source::Attention, &format!("paged_decode_{sfx}"))?;
        let cfg = LaunchConfig {
            grid_dim: (s.heads as u32, seqs, parts as u32),
            block_dim: (DECODE_THREADS, 1, 1),
            shared_mem_bytes: ((partition + 2 * DECODE_WARPS + DECODE_WARPS * s.head_dim) * 4)
                as u32,
        };
        let partition_i = partition as i32;
        let null = 0u64;
        // Split-K: each partition's max, exp-sum and normalised output, merged below.
        let mut split = if parts > 1 {
            let n = host.num_seqs() * s.heads * parts;
            Some((
                dev.alloc_zeros::<f32>(n)?,
                dev.alloc_zeros::<f32>(n)?,
                dev.alloc_zeros::<f32>(n * s.head_dim)?,
            ))
        } else {
            None
        };
        let mut b = stream.launch_builder(&func);
        b.arg(&mut out);
        match split.as_mut() {
            Some((part_max, part_sum, part_out)) => {
                b.arg(part_max);
                b.arg(part_sum);
                b.arg(part_out);
            }
            None => {
                b.arg(&null);
                b.arg(&null);
                b.arg(&null);
            }
        }
        b.arg(&q_view);
        b.arg(&k);
        b.arg(&v);
        b.arg(&block_tables);
        b.arg(&query_starts);
        b.arg(&context_lens);
        b.arg(&heads);
        b.arg(&kv_heads);
        b.arg(&head_dim);
        b.arg(&block_size);
        b.arg(&max_blocks);
        b.arg(&partition_i);
        b.arg(&scale);
        // SAFETY: the arguments match the kernel's signature; the layout was validated against
        // the caches' shapes; the partition buffers hold seqs * heads * parts entries.
        unsafe { b.launch(cfg) }.w()?;
        if let Some((part_max, part_sum, part_out)) = &split {
            let reduce = function(
                &dev,
                Source::Attention,
                &format!("paged_decode_reduce_{sfx}"),
            )?;
            let cfg = LaunchConfig {
                grid_dim: (s.heads as u32, seqs, 1),
                block_dim: (DECODE_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let parts_i = parts as i32;
            let mut b = stream.launch_builder(&reduce);
            b.arg(&mut out);
            b.arg(part_max);
            b.arg(part_sum);
            b.arg(part_out);
            b.arg(&query_starts);
            b.arg(&context_lens);
            b.arg(&heads);
            b.arg(&head_dim);
            b.arg(&partition_i);
            b.arg(&parts_i);
            // SAFETY: the arguments match the kernel's signature.
            unsafe { b.launch(cfg) }.w()?;
        }
    } else {
        let (tiles_g, tiles_l) = tensors.tiles.storage_and_layout();
        let tiles = view::<u32>(&tiles_g, tiles_l, "tiles")?;
        let func = function(&dev, Source::Attention, &format!("paged_prefill_{sfx}"))?;
        let smem = (PREFILL_TILE_Q * s.head_dim + 2 * PREFILL_TILE_K * (s.head_dim + 1)) * 4;
        if smem > DEFAULT_SMEM {
            func.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .w()?;
        }
        let cfg = LaunchConfig {
            grid_dim: ((host.tiles.len() / 3) as u32, s.heads as u32, 1),
            block_dim: (PREFILL_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut b = stream.launch_builder(&func);
        b.arg(&mut out);
        b.arg(&q_view);
        b.arg(&k);
        b.arg(&v);
        b.arg(&block_tables);
        b.arg(&query_starts);
        b.arg(&context_lens);
        b.arg(&tiles);
        b.arg(&heads);
        b.arg(&kv_heads);
        b.arg(&head_dim);
        b.arg(&block_size);
        b.arg(&max_blocks);
        b.arg(&scale);
        // SAFETY: the arguments match the kernel's signature; tiles index valid queries.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), ql.shape().clone()))
}

const SAMPLE_SM80: &str = include_str!(concat!(env!("OUT_DIR"), "/sample_sm80.ptx"));
const SAMPLE_SM90: &str = include_str!(concat!(env!("OUT_DIR"), "/sample_sm90.ptx"));
const SAMPLE_THREADS: u32 = 256;

/// Launches `sample_rows` over f32 logits (modified in place) and reads back the tokens and
/// log-probabilities: `rows * (2 + 2 * MAX_LOGPROBS)` words, not the vocabulary.
pub(crate) fn sample(
    logits: &mut CudaStorage,
    layout: &Layout,
    specs: &[crate::sampling::RowSampling],
) -> Result<Vec<crate::sampling::SampledToken>> {
    use crate::sampling::{SampledToken, MAX_LOGPROBS};
    let dev = logits.device().clone();
    let stream = dev.cuda_stream();
    let (l0, l1) = contiguous(layout, "logits")?;
    let (rows, vocab) = (layout.dims()[0], layout.dims()[1]);
    let (major, minor) = stream.context().compute_capability().w()?;
    if major < 8 {
        bail!("liftoff's CUDA kernels need compute capability 8.0 or newer, this GPU has {major}.{minor}");
    }
    let (ptx, module) = if major >= 9 {
        (SAMPLE_SM90, "liftoff_sample_sm90")
    } else {
        (SAMPLE_SM80, "liftoff_sample_sm80")
    };
    let func = dev
        .get_or_load_custom_func("sample_rows", module, ptx)?
        .into_cuda_function();
    let mut fparams = Vec::with_capacity(rows * 4);
    let mut uparams = Vec::with_capacity(rows * 4);
    let (mut pen_off, mut pen_ids, mut ban_off, mut ban_ids) =
        (vec![0u32], Vec::new(), vec![0u32], Vec::new());
    // Additive adjustments (distinct ids per row, merged by `sample`).
    let (mut adj_off, mut adj_ids, mut adj_vals) = (vec![0u32], Vec::new(), Vec::new());
    // Bitmasks of the constrained rows (an unconstrained row has none: equal offsets).
    let (mut mask_off, mut mask_words) = (vec![0u32], Vec::new());
    for s in specs {
        fparams.extend_from_slice(&[s.temperature, s.top_p, s.repetition_penalty, s.uniform]);
        // The 4th: the forced token (teacher forcing), u32::MAX when the row samples.
        uparams.extend_from_slice(&[
            s.top_k,
            s.logprobs,
            s.token_logprob as u32,
            s.force.unwrap_or(u32::MAX),
        ]);
        pen_ids.extend_from_slice(&s.penalized);
        pen_off.push(pen_ids.len() as u32);
        adj_ids.extend(s.adjust.iter().map(|a| a.0));
        adj_vals.extend(s.adjust.iter().map(|a| a.1));
        adj_off.push(adj_ids.len() as u32);
        ban_ids.extend_from_slice(&s.banned);
        ban_off.push(ban_ids.len() as u32);
        // A constrained row always has a word (an empty mask allows nothing).
        match &s.allowed {
            Some(w) if w.is_empty() => mask_words.push(0),
            Some(w) => mask_words.extend_from_slice(w),
            None => {}
        }
        mask_off.push(mask_words.len() as u32);
    }
    // Never an empty buffer (the offsets say nothing is read).
    pen_ids.push(0);
    adj_ids.push(0);
    adj_vals.push(0f32);
    ban_ids.push(0);
    mask_words.push(0);
    let fparams = stream.clone_htod(&fparams).w()?;
    let uparams = stream.clone_htod(&uparams).w()?;
    let pen_off = stream.clone_htod(&pen_off).w()?;
    let pen_ids = stream.clone_htod(&pen_ids).w()?;
    let adj_off = stream.clone_htod(&adj_off).w()?;
    let adj_ids = stream.clone_htod(&adj_ids).w()?;
    let adj_vals = stream.clone_htod(&adj_vals).w()?;
    let ban_off = stream.clone_htod(&ban_off).w()?;
    let ban_ids = stream.clone_htod(&ban_ids).w()?;
    let mask_off = stream.clone_htod(&mask_off).w()?;
    let mask_words = stream.clone_htod(&mask_words).w()?;
    let mut tokens = stream.alloc_zeros::<u32>(rows).w()?;
    let mut top_ids = stream.alloc_zeros::<u32>(rows * MAX_LOGPROBS).w()?;
    let mut top_lp = stream.alloc_zeros::<f32>(rows * MAX_LOGPROBS).w()?;
    // One slot per penalised id (the id list ends with a padding entry).
    let mut pen_raw = stream.alloc_zeros::<f32>(pen_ids.len()).w()?;
    // One slot per adjusted id, likewise.
    let mut adj_raw = stream.alloc_zeros::<f32>(adj_ids.len()).w()?;
    let mut token_lp = stream.alloc_zeros::<f32>(rows).w()?;
    let mut x = logits.as_cuda_slice_mut::<f32>()?.slice_mut(l0..l1);
    let vocab_i = vocab as i32;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (SAMPLE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = stream.launch_builder(&func);
    b.arg(&mut x);
    b.arg(&vocab_i);
    b.arg(&fparams);
    b.arg(&uparams);
    b.arg(&pen_off);
    b.arg(&pen_ids);
    b.arg(&adj_off);
    b.arg(&adj_ids);
    b.arg(&adj_vals);
    b.arg(&ban_off);
    b.arg(&ban_ids);
    b.arg(&mask_off);
    b.arg(&mask_words);
    b.arg(&mut tokens);
    b.arg(&mut top_ids);
    b.arg(&mut top_lp);
    b.arg(&mut pen_raw);
    b.arg(&mut adj_raw);
    b.arg(&mut token_lp);
    // SAFETY: the arguments match the kernel's signature; every listed id (and every forced
    // one) is below `vocab` (checked by `sample`).
    unsafe { b.launch(cfg) }.w()?;
    let tokens = stream.clone_dtoh(&tokens).w()?;
    let token_lp = if specs.iter().any(|s| s.token_logprob) {
        stream.clone_dtoh(&token_lp).w()?
    } else {
        Vec::new()
    };
    let want = specs.iter().any(|s| s.logprobs > 0);
    let (top_ids, top_lp) = if want {
        (
            stream.clone_dtoh(&top_ids).w()?,
            stream.clone_dtoh(&top_lp).w()?,
        )
    } else {
        (Vec::new(), Vec::new())
    };
    Ok(specs
        .iter()
        .enumerate()
        .map(|(r, s)| SampledToken {
            token: tokens[r],
            top_logprobs: (0..s.logprobs as usize)
                .map(|j| (top_ids[r * MAX_LOGPROBS + j], top_lp[r * MAX_LOGPROBS + j]))
                .collect(),
            logprob: s.token_logprob.then(|| token_lp[r]),
        })
        .collect())
}
