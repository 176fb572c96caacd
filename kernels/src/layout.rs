//! Where one step's queries and KV blocks are: the metadata every attention op reads.

use candle_core::{bail, Device, Result, Tensor};

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy)]
pub struct SeqSpan<'a> {
    /// First of its queries in the step's flat token list.
    pub query_start: usize,
    /// Its queries this step (the last `query_len` positions of its context).
    pub query_len: usize,
    /// Keys in the cache after this step's writes (the last query's position + 1).
    pub context_len: usize,
    /// Physical KV-cache blocks in logical order.
    pub block_table: &'a [u32],
}

/// The layout on the host (what the CPU ops read and the device tensors are made from).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostLayout {
    pub block_size: usize,
    pub num_tokens: usize,
    /// Columns of `block_tables` (the longest table; shorter rows are padded with 0).
    pub max_blocks: usize,
    pub max_query_len: usize,
    pub max_context_len: usize,
    /// `[num_seqs, max_blocks]`.
    pub block_tables: Vec<u32>,
    /// `[num_seqs + 1]`: sequence `s` has queries `query_starts[s]..query_starts[s + 1]`.
    pub query_starts: Vec<u32>,
    /// `[num_seqs]`.
    pub context_lens: Vec<u32>,
    /// Prefill tiles `[num_tiles, 3]`: (sequence, first query, rows), at most
    /// [`PREFILL_TILE_Q`](crate::PREFILL_TILE_Q) rows of one sequence each.
    pub tiles: Vec<u32>,
    /// `[num_tokens]`: each query's position in its sequence.
    pub positions: Vec<u32>,
    /// `[num_tokens]`: the cache slot (`block * block_size + offset`) its key and value go to.
    pub slots: Vec<u32>,
    /// Largest block id any table names (the cache must have more blocks than this).
    pub max_block: u32,
}

impl HostLayout {
    /// Number of sequences.
    pub fn num_seqs(&self) -> usize {
        self.context_lens.len()
    }

    /// Sequence `s`'s block table (padding included).
    pub fn block_table(&self, s: usize) -> &[u32] {
        &self.block_tables[s * self.max_blocks..(s + 1) * self.max_blocks]
    }

    /// For each flat query, its sequence.
    pub fn token_sequences(&self) -> Vec<usize> {
        let mut of = vec![0; self.num_tokens];
        for s in 0..self.num_seqs() {
            of[self.query_starts[s] as usize..self.query_starts[s + 1] as usize].fill(s);
        }
        of
    }

    /// Whether every sequence has one query (the decode kernel applies).
    pub fn is_decode(&self) -> bool {
        self.max_query_len <= 1
    }
}

/// [`HostLayout`] plus, on a GPU, the same arrays as device tensors.
#[derive(Debug, Clone)]
pub struct PagedLayout {
    host: HostLayout,
    tensors: Option<DeviceTensors>,
}

#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct DeviceTensors {
    pub block_tables: Tensor,
    pub query_starts: Tensor,
    pub context_lens: Tensor,
    pub tiles: Tensor,
    pub positions: Tensor,
    pub slots: Tensor,
}

impl PagedLayout {
    /// Validates the spans (in order, contiguous, tables long enough) and, on a GPU, copies the
    /// metadata to `device` once for all layers of the step.
    pub fn new(spans: &[SeqSpan], block_size: usize, device: &Device) -> Result<Self> {
        if block_size == 0 {
            bail!("block_size must be positive");
        }
        let max_blocks = spans
            .iter()
            .map(|s| s.block_table.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut host = HostLayout {
            block_size,
            max_blocks,
            ..HostLayout::default()
        };
        host.query_starts.push(0);
        for (i, s) in spans.iter().enumerate() {
            if s.query_start != host.num_tokens {
                bail!(
                    "sequence {i} starts at token {} but the previous one ended at {}",
                    s.query_start,
                    host.num_tokens
                );
            }
            if s.query_len == 0 || s.query_len > s.context_len {
                bail!(
                    "sequence {i}: {} queries for a context of {}",
                    s.query_len,
                    s.context_len
                );
            }
            if s.context_len.div_ceil(block_size) > s.block_table.len() {
                bail!(
                    "sequence {i}: {} blocks of {block_size} cannot hold {} positions",
                    s.block_table.len(),
                    s.context_len
                );
            }
            host.block_tables.extend_from_slice(s.block_table);
            host.block_tables.resize((i + 1) * max_blocks, 0);
            let used = &s.block_table[..s.context_len.div_ceil(block_size)];
            host.max_block = used.iter().copied().fold(host.max_block, u32::max);
            for pos in s.context_len - s.query_len..s.context_len {
                host.positions.push(pos as u32);
                host.slots.push(
                    s.block_table[pos / block_size] * block_size as u32 + (pos % block_size) as u32,
                );
            }
            host.num_tokens += s.query_len;
            host.query_starts.push(host.num_tokens as u32);
            host.context_lens.push(s.context_len as u32);
            host.max_query_len = host.max_query_len.max(s.query_len);
            host.max_context_len = host.max_context_len.max(s.context_len);
            let tile = crate::PREFILL_TILE_Q;
            for first in (0..s.query_len).step_by(tile) {
                host.tiles.extend_from_slice(&[
                    i as u32,
                    (s.query_start + first) as u32,
                    tile.min(s.query_len - first) as u32,
                ]);
            }
        }
        let tensors = if device.is_cpu() {
            None
        } else {
            let n = host.num_seqs();
            Some(DeviceTensors {
                block_tables: Tensor::from_slice(&host.block_tables, (n, max_blocks), device)?,
                query_starts: Tensor::from_slice(&host.query_starts, n + 1, device)?,
                context_lens: Tensor::from_slice(&host.context_lens, n, device)?,
                tiles: Tensor::from_slice(&host.tiles, (host.tiles.len() / 3, 3), device)?,
                positions: Tensor::from_slice(&host.positions, host.num_tokens, device)?,
                slots: Tensor::from_slice(&host.slots, host.num_tokens, device)?,
            })
        };
        Ok(Self { host, tensors })
    }

    /// The host arrays.
    pub fn host(&self) -> &HostLayout {
        &self.host
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn tensors(&self) -> Result<&DeviceTensors> {
        match &self.tensors {
            Some(t) => Ok(t),
            None => bail!("the paged layout was made for the CPU"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_pads_tables_and_tiles_long_prompts() {
        let (a, b) = ([3u32, 7], [5u32]);
        let spans = [
            SeqSpan {
                query_start: 0,
                query_len: 20,
                context_len: 20,
                block_table: &a,
            },
            SeqSpan {
                query_start: 20,
                query_len: 1,
                context_len: 9,
                block_table: &b,
            },
        ];
        let l = PagedLayout::new(&spans, 16, &Device::Cpu).unwrap();
        let h = l.host();
        assert_eq!(h.block_tables, vec![3, 7, 5, 0]);
        assert_eq!(h.query_starts, vec![0, 20, 21]);
        assert_eq!(h.tiles, vec![0, 0, 16, 0, 16, 4, 1, 20, 1]);
        assert_eq!(h.positions[19], 19);
        assert_eq!(h.positions[20], 8);
        assert_eq!(h.token_sequences()[19..], [0, 1]);
        assert_eq!(h.slots[17], 7 * 16 + 1);
        assert_eq!(h.slots[20], 5 * 16 + 8);
        assert_eq!(h.max_block, 7);
        assert!(!h.is_decode());
    }

    #[test]
    fn layout_rejects_short_tables_and_gaps() {
        let t = [1u32];
        let span = |start, len, ctx| SeqSpan {
            query_start: start,
            query_len: len,
            context_len: ctx,
            block_table: &t,
        };
        let err = |s: &[SeqSpan]| {
            PagedLayout::new(s, 4, &Device::Cpu)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[span(0, 1, 5)]).contains("cannot hold 5"));
        assert!(err(&[span(1, 1, 2)]).contains("starts at token 1"));
        assert!(err(&[span(0, 3, 2)]).contains("3 queries"));
    }
}
