//! Rotary position embeddings applied in place to `[tokens, heads, head_dim]` queries or keys.

use crate::storage::{cpu_f32_mut, with_cpu_f32};
use crate::PagedLayout;
use candle_core::{bail, CpuStorage, DType, Device, InplaceOp1, Layout, Result, Tensor};

/// cos/sin tables `[max_positions, head_dim / 2]` (f32) on the model's device.
#[derive(Debug, Clone)]
pub struct RotaryTables {
    cos: Tensor,
    sin: Tensor,
    interleaved: bool,
}

impl RotaryTables {
    /// Tables from host values; `interleaved` rotates pairs `(2i, 2i + 1)` (GGUF's layout),
    /// otherwise `(i, i + half)` (Hugging Face's).
    pub fn new(
        cos: &[f32],
        sin: &[f32],
        half: usize,
        interleaved: bool,
        device: &Device,
    ) -> Result<Self> {
        if half == 0 || cos.len() != sin.len() || !cos.len().is_multiple_of(half) {
            bail!(
                "rotary tables: {} cos and {} sin values for half {half}",
                cos.len(),
                sin.len()
            );
        }
        let rows = cos.len() / half;
        Ok(Self {
            cos: Tensor::from_slice(cos, (rows, half), device)?,
            sin: Tensor::from_slice(sin, (rows, half), device)?,
            interleaved,
        })
    }

    /// Positions the tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Half the head dimension.
    pub fn half(&self) -> usize {
        self.cos.dims()[1]
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn parts(&self) -> (&Tensor, &Tensor, bool) {
        (&self.cos, &self.sin, self.interleaved)
    }
}

/// Rotates `x` (`[tokens, heads, head_dim]`, contiguous) in place by the layout's positions.
pub fn rotary_embedding(x: &Tensor, tables: &RotaryTables, layout: &PagedLayout) -> Result<()> {
    let (tokens, _heads, d) = x.dims3()?;
    let host = layout.host();
    if tokens != host.num_tokens || d != 2 * tables.half() {
        bail!(
            "rotary: input {:?} for {} tokens and head_dim {}",
            x.dims(),
            host.num_tokens,
            2 * tables.half()
        );
    }
    if let Some(&p) = host.positions.iter().max() {
        if p as usize >= tables.max_positions() {
            bail!(
                "rotary: position {p} is beyond the tables' {}",
                tables.max_positions()
            );
        }
    }
    if !x.is_contiguous() {
        bail!("rotary: the input must be contiguous");
    }
    if tokens == 0 {
        return Ok(());
    }
    if x.device().is_cpu() && x.dtype() != DType::F32 {
        bail!("rotary: the CPU implementation takes f32");
    }
    x.inplace_op1(&Rotary { tables, layout })
}

struct Rotary<'a> {
    tables: &'a RotaryTables,
    layout: &'a PagedLayout,
}

impl InplaceOp1 for Rotary<'_> {
    fn name(&self) -> &'static str {
        "rotary-embedding"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let heads = layout.dims()[1];
        let x = cpu_f32_mut(storage, layout, "rotary input")?;
        let half = self.tables.half();
        let positions = &self.layout.host().positions;
        with_cpu_f32(&self.tables.cos, "cos table", |cos| {
            with_cpu_f32(&self.tables.sin, "sin table", |sin| {
                crate::reference::rotary(
                    x,
                    positions,
                    cos,
                    sin,
                    heads,
                    half,
                    self.tables.interleaved,
                )
            })
        })?
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &mut candle_core::CudaStorage, layout: &Layout) -> Result<()> {
        crate::cuda::rotary(storage, layout, self.tables, self.layout)
    }
}
