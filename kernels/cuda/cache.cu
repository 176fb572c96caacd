// KV-cache writes by slot mapping and in-place rotary embedding.
#include "common.cuh"

// cache: [num_slots, row] (num_slots = blocks * block_size, row = kv_heads * head_dim);
// src: [tokens, row]; token t goes to slot slots[t]. One block per token.
template <typename T>
__device__ void write_kv_impl(T* __restrict__ cache, const T* __restrict__ src,
                              const uint32_t* __restrict__ slots, int row) {
  const int t = blockIdx.x;
  const size_t dst = (size_t)slots[t] * row;
  const size_t from = (size_t)t * row;
  for (int i = threadIdx.x; i < row; i += blockDim.x) cache[dst + i] = src[from + i];
}

// x: [tokens, heads, 2 * half], rotated in place by the angle of positions[t];
// cos/sin: [max_positions, half] (f32). `interleaved` pairs (2i, 2i+1) instead of (i, i+half).
template <typename T>
__device__ void rotary_impl(T* __restrict__ x, const uint32_t* __restrict__ positions,
                            const float* __restrict__ cos_table,
                            const float* __restrict__ sin_table, int heads, int half,
                            int interleaved) {
  const int t = blockIdx.x;
  const size_t base = (size_t)positions[t] * half;
  T* tok = x + (size_t)t * heads * 2 * half;
  for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
    const int h = i / half, j = i % half;
    T* head = tok + (size_t)h * 2 * half;
    const int a = interleaved ? 2 * j : j;
    const int b = interleaved ? 2 * j + 1 : j + half;
    const float c = cos_table[base + j], s = sin_table[base + j];
    const float x1 = to_f32(head[a]), x2 = to_f32(head[b]);
    head[a] = from_f32<T>(x1 * c - x2 * s);
    head[b] = from_f32<T>(x2 * c + x1 * s);
  }
}

#define ENTRY(T, SUFFIX)                                                                       \
  extern "C" __global__ void write_kv_##SUFFIX(T* cache, const T* src, const uint32_t* slots,  \
                                               int row) {                                      \
    write_kv_impl<T>(cache, src, slots, row);                                                  \
  }                                                                                            \
  extern "C" __global__ void rotary_##SUFFIX(T* x, const uint32_t* positions,                  \
                                             const float* cos_table, const float* sin_table,   \
                                             int heads, int half, int interleaved) {           \
    rotary_impl<T>(x, positions, cos_table, sin_table, heads, half, interleaved);              \
  }
FOR_EACH_DTYPE(ENTRY)
