//! Hands out KV-cache blocks: a free list with reference counts (shared prefixes hold a block
//! from several sequences; it returns to the pool when the last one lets go).

/// The free list and reference counts of one pool.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    free: Vec<u32>,
    ref_counts: Vec<u32>,
    block_size: usize,
}

impl BlockAllocator {
    /// A pool of `num_blocks` blocks of `block_size` tokens, all free.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            free: (0..num_blocks as u32).rev().collect(),
            ref_counts: vec![0; num_blocks],
            block_size,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks not held by any sequence.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Takes `n` blocks, or none if fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let blocks = self.free.split_off(self.free.len() - n);
        for &b in &blocks {
            self.ref_counts[b as usize] = 1;
        }
        Some(blocks)
    }

    /// Adds a holder to a block (a sequence sharing a cached prefix).
    pub fn retain(&mut self, block: u32) {
        self.ref_counts[block as usize] += 1;
    }

    /// Current holders of a block.
    pub fn ref_count(&self, block: u32) -> u32 {
        self.ref_counts[block as usize]
    }

    /// Drops one holder of each block; blocks nobody holds return to the free list.
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks {
            let rc = &mut self.ref_counts[b as usize];
            debug_assert!(*rc > 0, "double free of block {b}");
            *rc = rc.saturating_sub(1);
            if *rc == 0 {
                self.free.push(b);
            }
        }
    }

    /// Grows a block table so it covers `tokens` tokens; false if the pool ran out
    /// (the table is left unchanged).
    pub fn ensure_capacity(&mut self, table: &mut Vec<u32>, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(table.len());
        if need == 0 {
            return true;
        }
        match self.allocate(need) {
            Some(b) => {
                table.extend(b);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_and_frees_with_ref_counts() {
        let mut a = BlockAllocator::new(4, 16);
        let mut table = Vec::new();
        assert!(a.ensure_capacity(&mut table, 33));
        assert_eq!(table.len(), 3);
        assert_eq!(a.num_free(), 1);
        assert!(!a.ensure_capacity(&mut table, 80));
        assert_eq!(table.len(), 3, "a failed grow leaves the table as it was");
        a.retain(table[0]);
        a.release(&table);
        assert_eq!(a.num_free(), 3, "the shared block stays held");
        a.release(&table[..1]);
        assert_eq!(a.num_free(), 4);
    }
}
