//! Hands out KV-cache blocks and caches prefixes.
//!
//! Blocks have reference counts: a full block whose tokens match another request's prefix is
//! shared instead of recomputed. A full block is registered with its tokens and the cached
//! block before it (its parent); when its last holder lets go it is kept, still findable, on
//! an evictable list and reused by the next request with that prefix unless an allocation
//! needs the memory first (least recently released goes first).
//!
//! A hit is never taken on a hash alone: the index is a keyed hash of (parent, tokens), and
//! the block it names must hold exactly the request's tokens after exactly the block the
//! request matched before it. Blocks carry a generation that changes whenever a block is
//! handed out again, so a block cached after a parent that has since been reused for other
//! tokens is never matched. A hash collision, accidental or crafted, costs a miss, never
//! another prompt's keys and values (vLLM's CVE-2025-25183 was that bug).
//!
//! Only full blocks are shared and a sequence only writes past its shared prefix, so a shared
//! block is never written: sharing needs no copy-on-write.

use std::collections::hash_map::{Entry, RandomState};
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;

/// Where a cached prefix ends: a block, and the generation it had when it was cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PrefixId {
    block: u32,
    generation: u64,
}

/// The index key of a block: a hash of its parent and its tokens. Only an index: every hit is
/// verified against the block's stored tokens and parent.
pub type PrefixHasher = Box<dyn Fn(Option<PrefixId>, &[u32]) -> u64 + Send + Sync>;

/// What a registered block holds.
#[derive(Debug, Clone)]
struct Cached {
    key: u64,
    tokens: Box<[u32]>,
    parent: Option<PrefixId>,
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
pub struct BlockManager {
    block_size: usize,
    ref_counts: Vec<u32>,
    /// Bumped each time a block is handed out.
    generations: Vec<u64>,
    /// Blocks never filled or whose cache entry was dropped.
    free: Vec<u32>,
    /// Released blocks that still hold a cached prefix, oldest first (may hold stale entries).
    evictable: VecDeque<u32>,
    num_evictable: usize,
    cached: Vec<Option<Cached>>,
    by_key: HashMap<u64, u32>,
    hasher: PrefixHasher,
    prefix_caching: bool,
    stats: PrefixCacheStats,
}

impl std::fmt::Debug for BlockManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockManager")
            .field("blocks", &self.num_blocks())
            .field("free", &self.num_free())
            .field("cached", &self.num_cached())
            .finish()
    }
}

impl BlockManager {
    /// A pool of `num_blocks` blocks of `block_size` tokens, all free.
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        // A per-process random key: nobody can aim a request at another's index entry.
        let keyed = RandomState::new();
        let hasher: PrefixHasher = Box::new(move |parent, tokens| keyed.hash_one((parent, tokens)));
        Self::with_hasher(num_blocks, block_size, prefix_caching, hasher)
    }

    /// [`new`](Self::new) with another index hash (tests use colliding ones).
    pub fn with_hasher(
        num_blocks: usize,
        block_size: usize,
        prefix_caching: bool,
        hasher: PrefixHasher,
    ) -> Self {
        Self {
            block_size,
            ref_counts: vec![0; num_blocks],
            generations: vec![0; num_blocks],
            free: (0..num_blocks as u32).rev().collect(),
            evictable: VecDeque::new(),
            num_evictable: 0,
            cached: vec![None; num_blocks],
            by_key: HashMap::new(),
            hasher,
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

    /// Blocks no sequence holds that still hold a cached prefix.
    pub fn num_cached(&self) -> usize {
        self.num_evictable
    }

    /// Prefix-cache counters.
    pub fn stats(&self) -> PrefixCacheStats {
        self.stats
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    fn id(&self, block: u32) -> PrefixId {
        PrefixId {
            block,
            generation: self.generations[block as usize],
        }
    }

    /// Forgets what `block` caches.
    fn uncache(&mut self, block: u32) {
        if let Some(c) = self.cached[block as usize].take() {
            if self.by_key.get(&c.key) == Some(&block) {
                self.by_key.remove(&c.key);
            }
        }
    }

    fn take_one(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => loop {
                let b = self.evictable.pop_front()?;
                // Skip entries revived by a prefix hit since they were released.
                if self.ref_counts[b as usize] == 0 && self.cached[b as usize].is_some() {
                    self.num_evictable -= 1;
                    self.uncache(b);
                    break b;
                }
            },
        };
        // A new use: whatever was cached after this block's old contents no longer matches.
        self.generations[b as usize] += 1;
        Some(b)
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
                if self.cached[b as usize].is_some() {
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

    /// The cached block holding `tokens` right after `parent`, if there is one.
    fn find(&self, parent: Option<PrefixId>, tokens: &[u32]) -> Option<u32> {
        let b = *self.by_key.get(&(self.hasher)(parent, tokens))?;
        let c = self.cached[b as usize].as_ref()?;
        (c.parent == parent && *c.tokens == *tokens).then_some(b)
    }

    /// Finds the cached blocks of the longest prefix of `tokens` (full blocks only, and never
    /// the block holding the last token, which must be computed to get logits). The returned
    /// blocks are held for the caller; returns them with the prefix they end (what the
    /// caller's next full block is registered after).
    pub fn match_prefix(&mut self, tokens: &[u32]) -> (Vec<u32>, Option<PrefixId>) {
        let mut table = Vec::new();
        let mut parent = None;
        if !self.prefix_caching {
            return (table, parent);
        }
        let full = tokens.len().saturating_sub(1) / self.block_size;
        for i in 0..full {
            // A lookup is counted when made: every hit, and the first miss that ends the walk.
            self.stats.queried_blocks += 1;
            let block = &tokens[i * self.block_size..(i + 1) * self.block_size];
            let Some(b) = self.find(parent, block) else {
                break;
            };
            self.stats.hit_blocks += 1;
            if self.ref_counts[b as usize] == 0 {
                // Revive from the evictable list (its stale entry is skipped later).
                self.num_evictable -= 1;
            }
            self.ref_counts[b as usize] += 1;
            table.push(b);
            parent = Some(self.id(b));
        }
        (table, parent)
    }

    /// Registers `block`, which now holds `tokens` (a full block) after the cached prefix
    /// `parent`, so later requests can share it. Returns the prefix this block ends, to
    /// register the next block after: this block's, or that of an identical block already
    /// cached. `None` when it cannot be cached (caching off, or the index slot is taken by
    /// other tokens): the sequence's later blocks are then not cached either.
    pub fn register(
        &mut self,
        block: u32,
        parent: Option<PrefixId>,
        tokens: &[u32],
    ) -> Option<PrefixId> {
        if !self.prefix_caching || tokens.len() != self.block_size {
            return None;
        }
        if let Some(c) = &self.cached[block as usize] {
            // Already cached (a shared block): it must be these tokens after this parent.
            return (c.parent == parent && *c.tokens == *tokens).then(|| self.id(block));
        }
        if let Some(b) = self.find(parent, tokens) {
            return Some(self.id(b));
        }
        let key = (self.hasher)(parent, tokens);
        match self.by_key.entry(key) {
            Entry::Occupied(_) => None,
            Entry::Vacant(e) => {
                e.insert(block);
                self.cached[block as usize] = Some(Cached {
                    key,
                    tokens: tokens.into(),
                    parent,
                });
                Some(self.id(block))
            }
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

    /// What the scheduler does for one request: match, allocate, register the full blocks.
    fn fill(m: &mut BlockManager, tokens: &[u32]) -> Vec<u32> {
        let (mut table, mut parent) = m.match_prefix(tokens);
        let start = table.len();
        assert!(m.ensure_capacity(&mut table, tokens.len()));
        for i in start..tokens.len() / 4 {
            match m.register(table[i], parent, &tokens[i * 4..(i + 1) * 4]) {
                Some(id) => parent = Some(id),
                None => break,
            }
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

    /// Index hashes that collide: of the parent ignored (same block tokens after different
    /// prefixes), and of everything (one key for all). No block is ever shared with a prompt
    /// it does not belong to, and true prefixes are still shared where the index allows.
    #[test]
    fn colliding_hashes_never_share_another_prompts_blocks() {
        let tokens_only: PrefixHasher = Box::new(|_, t| t.iter().map(|&x| x as u64).sum());
        let mut m = BlockManager::with_hasher(8, 4, true, tokens_only);
        let a: Vec<u32> = vec![1, 2, 3, 4, 5, 6, 7, 8, 9];
        let ta = fill(&mut m, &a);
        m.release(&ta);
        // b's second block has a's second block's tokens after another first block: its key
        // collides with a's second block.
        let b: Vec<u32> = vec![9, 9, 9, 9, 5, 6, 7, 8, 9];
        let tb = fill(&mut m, &b);
        m.release(&tb);
        let (t, _) = m.match_prefix(&b);
        assert_eq!(t, tb[..1], "b shares only its own first block");
        m.release(&t);
        // A first block of a's tokens permuted: its key collides with a's first block.
        let (t, _) = m.match_prefix(&[2, 1, 3, 4, 5, 6, 7, 8, 9]);
        assert!(t.is_empty(), "{t:?}");
        // a itself still hits both blocks.
        let (t, _) = m.match_prefix(&a);
        assert_eq!(t, ta[..2]);
        m.release(&t);

        let constant: PrefixHasher = Box::new(|_, _| 7);
        let mut m = BlockManager::with_hasher(8, 4, true, constant);
        let ta = fill(&mut m, &a);
        m.release(&ta);
        for other in [vec![9u32, 9, 9, 9, 9, 9, 9, 9, 9], b.clone()] {
            let (t, _) = m.match_prefix(&other);
            assert!(t.is_empty(), "{other:?} matched {t:?}");
        }
        let (t, _) = m.match_prefix(&a);
        assert_eq!(t, ta[..1], "one key: only a's first block is indexed");
    }

    /// A block cached after a parent that was evicted and reused for other tokens is never
    /// matched, even when the new parent holds tokens whose index key collides.
    #[test]
    fn a_reused_parent_orphans_its_children() {
        let tokens_only: PrefixHasher = Box::new(|_, t| t.iter().map(|&x| x as u64).sum());
        let mut m = BlockManager::with_hasher(2, 4, true, tokens_only);
        let a: Vec<u32> = vec![1, 2, 3, 4, 5, 6, 7, 8];
        let ta = fill(&mut m, &a);
        m.release(&ta);
        // Evict a's first block (released first) and fill it with other tokens, whose key
        // equals that of a's first block.
        let c: Vec<u32> = vec![4, 3, 2, 1];
        let tc = fill(&mut m, &c);
        assert_eq!(tc[0], ta[0], "the pool reused a's first block");
        m.release(&tc);
        // c's block is a's old first block with new contents; a's second block still follows
        // it in the index but must not match.
        let (t, _) = m.match_prefix(&[4, 3, 2, 1, 5, 6, 7, 8, 0]);
        assert_eq!(t, tc[..1], "only c's own block is shared");
        m.release(&t);
    }
}
