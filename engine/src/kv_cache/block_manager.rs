//! Hands out KV-cache blocks and caches prefixes.
//!
//! Blocks have reference counts: a full block whose tokens match another request's prefix is
//! shared instead of recomputed. Every full block is registered under a hash of its tokens
//! chained with the hash of the blocks before it; when its last holder lets go it is kept,
//! still findable, on an evictable list and reused by the next request with that prefix unless
//! an allocation needs the memory first (least recently released goes first).
//!
//! Only full blocks are shared and a sequence only writes past its shared prefix, so a shared
//! block is never written: sharing needs no copy-on-write.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

/// Hash of a full block: its tokens chained with the hash of everything before it.
pub fn block_hash(prev: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    prev.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// Counters of the prefix cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Full prompt blocks looked up.
    pub queried_blocks: u64,
    /// Of those, found in the cache.
    pub hit_blocks: u64,
}

/// The blocks of one pool.
#[derive(Debug, Clone)]
pub struct BlockManager {
    block_size: usize,
    ref_counts: Vec<u32>,
    /// Blocks never filled or whose hash was dropped.
    free: Vec<u32>,
    /// Released blocks that still hold a cached prefix, oldest first (may hold stale entries).
    evictable: VecDeque<u32>,
    num_evictable: usize,
    hashes: Vec<Option<u64>>,
    by_hash: HashMap<u64, u32>,
    prefix_caching: bool,
    stats: PrefixCacheStats,
}

impl BlockManager {
    /// A pool of `num_blocks` blocks of `block_size` tokens, all free.
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        Self {
            block_size,
            ref_counts: vec![0; num_blocks],
            free: (0..num_blocks as u32).rev().collect(),
            evictable: VecDeque::new(),
            num_evictable: 0,
            hashes: vec![None; num_blocks],
            by_hash: HashMap::new(),
            prefix_caching,
            stats: PrefixCacheStats::default(),
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

    /// Blocks no sequence holds (cached prefixes included: they can be evicted).
    pub fn num_free(&self) -> usize {
        self.free.len() + self.num_evictable
    }

    /// Blocks held by sequences.
    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Prefix-cache counters.
    pub fn stats(&self) -> PrefixCacheStats {
        self.stats
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    fn take_one(&mut self) -> Option<u32> {
        if let Some(b) = self.free.pop() {
            return Some(b);
        }
        while let Some(b) = self.evictable.pop_front() {
            // Skip entries revived by a prefix hit since they were released.
            if self.ref_counts[b as usize] == 0 && self.hashes[b as usize].is_some() {
                self.num_evictable -= 1;
                if let Some(h) = self.hashes[b as usize].take() {
                    self.by_hash.remove(&h);
                }
                return Some(b);
            }
        }
        None
    }

    /// Takes `n` blocks, or none if fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.num_free() {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let b = self.take_one()?;
            self.ref_counts[b as usize] = 1;
            out.push(b);
        }
        Some(out)
    }

    /// Grows a block table so it covers `tokens` tokens; false (table unchanged) if the pool
    /// ran out.
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

    /// Drops one holder of each block; unheld blocks become free (or evictable if cached).
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks {
            let rc = &mut self.ref_counts[b as usize];
            debug_assert!(*rc > 0, "double free of block {b}");
            *rc = rc.saturating_sub(1);
            if *rc == 0 {
                if self.hashes[b as usize].is_some() {
                    self.evictable.push_back(b);
                    self.num_evictable += 1;
                } else {
                    self.free.push(b);
                }
            }
        }
    }

    /// Current holders of a block.
    pub fn ref_count(&self, block: u32) -> u32 {
        self.ref_counts[block as usize]
    }

    /// Finds the cached blocks of the longest prefix of `tokens` (full blocks only, and never
    /// the block holding the last token, which must be computed to get logits). The returned
    /// blocks are held for the caller; returns them with the chained hash of the last one.
    pub fn match_prefix(&mut self, tokens: &[u32]) -> (Vec<u32>, u64) {
        let mut table = Vec::new();
        let mut hash = 0u64;
        if !self.prefix_caching {
            return (table, hash);
        }
        let full = tokens.len().saturating_sub(1) / self.block_size;
        for i in 0..full {
            // A lookup is counted when made: every hit, and the first miss that ends the walk.
            self.stats.queried_blocks += 1;
            let h = block_hash(
                hash,
                &tokens[i * self.block_size..(i + 1) * self.block_size],
            );
            let Some(&b) = self.by_hash.get(&h) else {
                break;
            };
            self.stats.hit_blocks += 1;
            if self.ref_counts[b as usize] == 0 {
                // Revive from the evictable list (its stale entry is skipped later).
                self.num_evictable -= 1;
            }
            self.ref_counts[b as usize] += 1;
            table.push(b);
            hash = h;
        }
        (table, hash)
    }

    /// Registers a block that now holds `tokens` (a full block) under `hash`, so later requests
    /// can share it. A block already cached under that hash keeps its place.
    pub fn register(&mut self, block: u32, hash: u64) {
        if !self.prefix_caching || self.hashes[block as usize].is_some() {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.by_hash.entry(hash) {
            e.insert(block);
            self.hashes[block as usize] = Some(hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_and_frees_with_ref_counts() {
        let mut a = BlockManager::new(4, 16, false);
        let mut table = Vec::new();
        assert!(a.ensure_capacity(&mut table, 33));
        assert_eq!(table.len(), 3);
        assert_eq!(a.num_free(), 1);
        assert!(!a.ensure_capacity(&mut table, 80));
        assert_eq!(table.len(), 3, "a failed grow leaves the table as it was");
        a.ref_counts[table[0] as usize] += 1;
        a.release(&table);
        assert_eq!(a.num_free(), 3, "the shared block stays held");
        a.release(&table[..1]);
        assert_eq!(a.num_free(), 4);
    }

    fn fill(m: &mut BlockManager, tokens: &[u32]) -> Vec<u32> {
        let (mut table, mut hash) = m.match_prefix(tokens);
        let start = table.len();
        assert!(m.ensure_capacity(&mut table, tokens.len()));
        for i in start..tokens.len() / 4 {
            hash = block_hash(hash, &tokens[i * 4..(i + 1) * 4]);
            m.register(table[i], hash);
        }
        table
    }

    #[test]
    fn shares_cached_prefixes_and_evicts_when_needed() {
        let mut m = BlockManager::new(6, 4, true);
        let a: Vec<u32> = (0..10).collect();
        let ta = fill(&mut m, &a);
        // Same first 8 tokens: two blocks shared, live.
        let mut b = a[..8].to_vec();
        b.extend([99, 98, 97]);
        let tb = fill(&mut m, &b);
        assert_eq!(&tb[..2], &ta[..2]);
        assert_eq!(m.ref_count(ta[0]), 2);
        // a's one lookup missed; b's two hit.
        assert_eq!(
            m.stats(),
            PrefixCacheStats {
                queried_blocks: 3,
                hit_blocks: 2
            }
        );
        m.release(&ta);
        m.release(&tb);
        assert_eq!(m.num_free(), 6);
        // Released but cached: a third request still hits.
        let tc = fill(&mut m, &a);
        assert_eq!(&tc[..2], &ta[..2]);
        m.release(&tc);
        // Filling the whole pool evicts the cached blocks.
        let all = m.allocate(6).unwrap();
        assert_eq!(all.len(), 6);
        m.release(&all);
        let (t, _) = m.match_prefix(&a);
        assert!(t.is_empty(), "evicted blocks are no longer found");
    }

    #[test]
    fn never_shares_the_block_with_the_last_token() {
        let mut m = BlockManager::new(4, 4, true);
        let a: Vec<u32> = (0..8).collect();
        let ta = fill(&mut m, &a);
        m.release(&ta);
        let (t, _) = m.match_prefix(&a);
        assert_eq!(t.len(), 1, "8 tokens: only the first block may be shared");
    }
}
