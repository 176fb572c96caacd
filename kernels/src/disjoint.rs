//! An output buffer that several rayon tasks write at once, each its own disjoint part (the
//! CPU matmuls and attention split outputs by columns or rows that are not contiguous runs,
//! so `par_chunks_mut` cannot hand them out).

/// A raw view of an `f32` buffer for disjoint writes from several threads.
#[derive(Clone, Copy)]
pub struct DisjointOut(*mut f32);

// SAFETY: the users write only indices no other task writes, while the buffer outlives the
// parallel region (every user documents its split at the write).
unsafe impl Send for DisjointOut {}
unsafe impl Sync for DisjointOut {}

impl DisjointOut {
    /// Views `buf`; it must outlive every write through the view.
    pub fn new(buf: &mut [f32]) -> Self {
        Self(buf.as_mut_ptr())
    }

    /// The element at `i` (a method, so closures capture the whole `Send` wrapper).
    pub fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}
