//! The batch description one forward pass runs on: a flat list of tokens from many sequences,
//! with their positions and block tables (vLLM's layout; the KV slots follow from those).
//! Prefill, chunked prefill and decode are all the same shape; a single `generate` is a batch
//! of one.

use serde::{Deserialize, Serialize};

/// Which logits a sequence wants back from a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogitsWanted {
    /// None (a prefill chunk that is not the last).
    None,
    /// The last token's (the next-token distribution).
    Last,
    /// Every token's (reference tests, prompt logprobs).
    All,
}

/// One sequence's share of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceChunk {
    /// First token of this sequence in the batch's flat token list.
    pub start: usize,
    /// Number of tokens of this sequence in the batch.
    pub len: usize,
    /// The sequence's block table (physical KV-cache blocks in logical order).
    pub block_table: Vec<u32>,
    /// Which logits to return.
    pub logits: LogitsWanted,
}

/// A batch of tokens for one forward pass.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchInput {
    /// Token ids, all sequences concatenated.
    pub token_ids: Vec<u32>,
    /// Position of each token in its sequence.
    pub positions: Vec<u32>,
    /// The sequences, in the order their tokens appear.
    pub sequences: Vec<SequenceChunk>,
}

impl BatchInput {
    /// Appends a chunk of `tokens` starting at position `first_pos` for a sequence whose
    /// blocks are `block_table`.
    pub fn push_sequence(
        &mut self,
        tokens: &[u32],
        first_pos: usize,
        block_table: &[u32],
        logits: LogitsWanted,
    ) {
        let start = self.token_ids.len();
        for (i, &t) in tokens.iter().enumerate() {
            let pos = first_pos + i;
            self.token_ids.push(t);
            self.positions.push(pos as u32);
        }
        self.sequences.push(SequenceChunk {
            start,
            len: tokens.len(),
            block_table: block_table.to_vec(),
            logits,
        });
    }

    /// Rows of the flat token list whose logits are returned, in order.
    pub fn logits_rows(&self) -> Vec<u32> {
        let mut rows = Vec::new();
        for s in &self.sequences {
            match s.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last => rows.push((s.start + s.len - 1) as u32),
                LogitsWanted::All => rows.extend((s.start..s.start + s.len).map(|r| r as u32)),
            }
        }
        rows
    }

    /// Number of tokens in the batch.
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }
}
