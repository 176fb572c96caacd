// Attention over the paged KV cache.
//
// Layouts: q and out [tokens, heads, head_dim]; k_cache and v_cache
// [num_blocks, block_size, kv_heads, head_dim]; block_tables [num_seqs, max_blocks];
// query_starts [num_seqs + 1] (flat token offsets); context_lens [num_seqs] (keys in the cache
// for the sequence, the step's own included). Query i of a sequence with q_len queries sits at
// position context_len - q_len + i and attends to positions 0..=that (causal).
//
// * paged_decode: one query per sequence. One CTA per (head, sequence, partition of
//   PARTITION keys); with one partition it writes the output directly, otherwise (split-K, for
//   long contexts) each CTA writes its partition's max, exp-sum and normalised output and
//   paged_decode_reduce merges them.
// * paged_prefill: any number of queries per sequence, FlashAttention-style: a CTA takes a
//   tile of TILE_Q queries of one sequence and one head, walks the keys in chunks of TILE_K
//   through shared memory with an online softmax, and never holds a row of scores.
#include "common.cuh"

#define DECODE_WARPS 4
#define MAX_HEAD_DIM 256
#define DIMS_PER_LANE (MAX_HEAD_DIM / WARP_SIZE)

template <typename T>
__device__ void paged_decode_impl(T* __restrict__ out, float* __restrict__ part_max,
                                  float* __restrict__ part_sum, float* __restrict__ part_out,
                                  const T* __restrict__ q, const T* __restrict__ k_cache,
                                  const T* __restrict__ v_cache,
                                  const uint32_t* __restrict__ block_tables,
                                  const uint32_t* __restrict__ query_starts,
                                  const uint32_t* __restrict__ context_lens, int heads,
                                  int kv_heads, int head_dim, int block_size, int max_blocks,
                                  int partition, float scale) {
  const int h = blockIdx.x, s = blockIdx.y, p = blockIdx.z;
  const int parts = gridDim.z;
  const int ctx = context_lens[s];
  const int start = p * partition;
  const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
  const size_t part_idx = ((size_t)s * heads + h) * parts + p;
  if (start >= ctx) {
    // An empty partition of a shorter sequence: weight zero in the merge.
    if (part_out != nullptr) {
      if (threadIdx.x == 0) {
        part_max[part_idx] = -FLT_MAX;
        part_sum[part_idx] = 0.f;
      }
      for (int x = threadIdx.x; x < head_dim; x += blockDim.x)
        part_out[part_idx * head_dim + x] = 0.f;
    }
    return;
  }
  const int end = min(start + partition, ctx);
  const int n = end - start;
  const int kvh = h / (heads / kv_heads);
  const size_t token = query_starts[s];

  extern __shared__ float smem[];
  float* scores = smem;                          // [partition]
  float* red = smem + partition;                 // [2 * DECODE_WARPS]
  float* partial = red + 2 * DECODE_WARPS;       // [DECODE_WARPS * head_dim]

  float qv[DIMS_PER_LANE];
  const T* qp = q + (token * heads + h) * head_dim;
#pragma unroll
  for (int i = 0; i < DIMS_PER_LANE; i++) {
    const int x = lane + i * WARP_SIZE;
    qv[i] = x < head_dim ? to_f32(qp[x]) * scale : 0.f;
  }
  const uint32_t* table = block_tables + (size_t)s * max_blocks;

  // Scores: a warp per key, each lane a slice of the head dimension (coalesced rows).
  float local_max = -FLT_MAX;
  for (int t = start + warp; t < end; t += DECODE_WARPS) {
    const size_t slot = (size_t)table[t / block_size] * block_size + t % block_size;
    const T* kp = k_cache + (slot * kv_heads + kvh) * head_dim;
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < DIMS_PER_LANE; i++) {
      const int x = lane + i * WARP_SIZE;
      if (x < head_dim) acc += qv[i] * to_f32(kp[x]);
    }
    acc = group_sum(acc, WARP_SIZE);
    if (lane == 0) scores[t - start] = acc;
    local_max = fmaxf(local_max, acc);
  }
  if (lane == 0) red[warp] = local_max;
  __syncthreads();
  float m = -FLT_MAX;
#pragma unroll
  for (int w = 0; w < DECODE_WARPS; w++) m = fmaxf(m, red[w]);

  float local_sum = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float e = __expf(scores[i] - m);
    scores[i] = e;
    local_sum += e;
  }
  local_sum = group_sum(local_sum, WARP_SIZE);
  if (lane == 0) red[DECODE_WARPS + warp] = local_sum;
  __syncthreads();
  float sum = 0.f;
#pragma unroll
  for (int w = 0; w < DECODE_WARPS; w++) sum += red[DECODE_WARPS + w];

  // Weighted values: a warp per key again, lanes over the head dimension.
  float acc[DIMS_PER_LANE];
#pragma unroll
  for (int i = 0; i < DIMS_PER_LANE; i++) acc[i] = 0.f;
  for (int t = start + warp; t < end; t += DECODE_WARPS) {
    const size_t slot = (size_t)table[t / block_size] * block_size + t % block_size;
    const T* vp = v_cache + (slot * kv_heads + kvh) * head_dim;
    const float w = scores[t - start];
#pragma unroll
    for (int i = 0; i < DIMS_PER_LANE; i++) {
      const int x = lane + i * WARP_SIZE;
      if (x < head_dim) acc[i] += w * to_f32(vp[x]);
    }
  }
#pragma unroll
  for (int i = 0; i < DIMS_PER_LANE; i++) {
    const int x = lane + i * WARP_SIZE;
    if (x < head_dim) partial[warp * head_dim + x] = acc[i];
  }
  __syncthreads();
  const float inv = 1.f / sum;
  for (int x = threadIdx.x; x < head_dim; x += blockDim.x) {
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < DECODE_WARPS; w++) o += partial[w * head_dim + x];
    if (part_out != nullptr) {
      part_out[part_idx * head_dim + x] = o * inv;
    } else {
      out[(token * heads + h) * head_dim + x] = from_f32<T>(o * inv);
    }
  }
  if (part_out != nullptr && threadIdx.x == 0) {
    part_max[part_idx] = m;
    part_sum[part_idx] = sum;
  }
}

// Merges the partitions of paged_decode: weights sum_p * exp(max_p - max) per partition.
template <typename T>
__device__ void paged_decode_reduce_impl(T* __restrict__ out, const float* __restrict__ part_max,
                                         const float* __restrict__ part_sum,
                                         const float* __restrict__ part_out,
                                         const uint32_t* __restrict__ query_starts,
                                         const uint32_t* __restrict__ context_lens, int heads,
                                         int head_dim, int partition, int parts) {
  const int h = blockIdx.x, s = blockIdx.y;
  const int used = (context_lens[s] + partition - 1) / partition;
  const size_t base = ((size_t)s * heads + h) * parts;
  float m = -FLT_MAX;
  for (int p = 0; p < used; p++) m = fmaxf(m, part_max[base + p]);
  float total = 0.f;
  for (int p = 0; p < used; p++) total += part_sum[base + p] * __expf(part_max[base + p] - m);
  const float inv = 1.f / total;
  const size_t token = query_starts[s];
  for (int x = threadIdx.x; x < head_dim; x += blockDim.x) {
    float o = 0.f;
    for (int p = 0; p < used; p++) {
      const float w = part_sum[base + p] * __expf(part_max[base + p] - m);
      o += w * part_out[(base + p) * head_dim + x];
    }
    out[(token * heads + h) * head_dim + x] = from_f32<T>(o * inv);
  }
}

#define TILE_Q 16
#define TILE_K 16
#define PREFILL_THREADS 128
#define ROWS_PER_WARP (TILE_Q / (PREFILL_THREADS / WARP_SIZE))  // 4: two passes of two rows
#define PREFILL_DIMS (MAX_HEAD_DIM / 16)                       // per lane of a 16-lane group

// tiles: [num_tiles, 3] = (sequence, first flat token, rows); a tile never spans sequences.
template <typename T>
__device__ void paged_prefill_impl(T* __restrict__ out, const T* __restrict__ q,
                                   const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                   const uint32_t* __restrict__ block_tables,
                                   const uint32_t* __restrict__ query_starts,
                                   const uint32_t* __restrict__ context_lens,
                                   const uint32_t* __restrict__ tiles, int heads, int kv_heads,
                                   int head_dim, int block_size, int max_blocks, float scale) {
  const int tile = blockIdx.x, h = blockIdx.y;
  const int s = tiles[tile * 3], first = tiles[tile * 3 + 1], rows = tiles[tile * 3 + 2];
  const int ctx = context_lens[s];
  const int q_len = query_starts[s + 1] - query_starts[s];
  // Position of the tile's first query.
  const int pos0 = ctx - q_len + (first - (int)query_starts[s]);
  const int kvh = h / (heads / kv_heads);
  const int stride = head_dim + 1;  // padded rows: no bank conflicts across keys
  const uint32_t* table = block_tables + (size_t)s * max_blocks;

  extern __shared__ float smem[];
  float* qs = smem;                       // [TILE_Q, head_dim], pre-scaled
  float* ks = qs + TILE_Q * head_dim;     // [TILE_K, stride]
  float* vs = ks + TILE_K * stride;       // [TILE_K, stride]

  for (int i = threadIdx.x; i < TILE_Q * head_dim; i += blockDim.x) {
    const int r = i / head_dim, x = i % head_dim;
    qs[i] = r < rows ? to_f32(q[((size_t)(first + r) * heads + h) * head_dim + x]) * scale : 0.f;
  }

  const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
  const int group = lane / 16, sub = lane % 16;
  // This lane's two rows (one per pass) and their softmax state.
  float m[2], l[2], acc[2][PREFILL_DIMS];
#pragma unroll
  for (int pass = 0; pass < 2; pass++) {
    m[pass] = -FLT_MAX;
    l[pass] = 0.f;
#pragma unroll
    for (int i = 0; i < PREFILL_DIMS; i++) acc[pass][i] = 0.f;
  }
  // Keys up to the last query's position.
  const int keys = pos0 + rows;
  for (int k0 = 0; k0 < keys; k0 += TILE_K) {
    __syncthreads();  // the previous chunk is no longer read
    for (int i = threadIdx.x; i < TILE_K * head_dim; i += blockDim.x) {
      const int j = i / head_dim, x = i % head_dim;
      const int t = k0 + j;
      float kv = 0.f, vv = 0.f;
      if (t < keys) {
        const size_t slot = (size_t)table[t / block_size] * block_size + t % block_size;
        const size_t off = (slot * kv_heads + kvh) * head_dim + x;
        kv = to_f32(k_cache[off]);
        vv = to_f32(v_cache[off]);
      }
      ks[j * stride + x] = kv;
      vs[j * stride + x] = vv;
    }
    __syncthreads();
#pragma unroll
    for (int pass = 0; pass < 2; pass++) {
      const int r = warp * ROWS_PER_WARP + pass * 2 + group;
      // Lane `sub` scores key k0 + sub for row r.
      float score = -FLT_MAX;
      const int t = k0 + sub;
      if (r < rows && t <= pos0 + r) {
        float d = 0.f;
        for (int x = 0; x < head_dim; x++) d += qs[r * head_dim + x] * ks[sub * stride + x];
        score = d;
      }
      const float cmax = group_max(score, 16);
      const float m_new = fmaxf(m[pass], cmax);
      const float pr = score == -FLT_MAX ? 0.f : __expf(score - m_new);
      const float corr = m[pass] == -FLT_MAX ? 0.f : __expf(m[pass] - m_new);
      l[pass] = l[pass] * corr + group_sum(pr, 16);
      m[pass] = m_new;
#pragma unroll
      for (int i = 0; i < PREFILL_DIMS; i++) acc[pass][i] *= corr;
      for (int j = 0; j < TILE_K; j++) {
        const float pj = __shfl_sync(FULL_MASK, pr, j, 16);
#pragma unroll
        for (int i = 0; i < PREFILL_DIMS; i++) {
          const int x = sub + 16 * i;
          if (x < head_dim) acc[pass][i] += pj * vs[j * stride + x];
        }
      }
    }
  }
#pragma unroll
  for (int pass = 0; pass < 2; pass++) {
    const int r = warp * ROWS_PER_WARP + pass * 2 + group;
    if (r >= rows) continue;
    const float inv = 1.f / l[pass];
#pragma unroll
    for (int i = 0; i < PREFILL_DIMS; i++) {
      const int x = sub + 16 * i;
      if (x < head_dim) out[((size_t)(first + r) * heads + h) * head_dim + x] = from_f32<T>(acc[pass][i] * inv);
    }
  }
}

#define ENTRY(T, SUFFIX)                                                                         \
  extern "C" __global__ void paged_decode_##SUFFIX(                                              \
      T* out, float* part_max, float* part_sum, float* part_out, const T* q, const T* k_cache,    \
      const T* v_cache, const uint32_t* block_tables, const uint32_t* query_starts,              \
      const uint32_t* context_lens, int heads, int kv_heads, int head_dim, int block_size,       \
      int max_blocks, int partition, float scale) {                                              \
    paged_decode_impl<T>(out, part_max, part_sum, part_out, q, k_cache, v_cache, block_tables,   \
                         query_starts, context_lens, heads, kv_heads, head_dim, block_size,      \
                         max_blocks, partition, scale);                                          \
  }                                                                                              \
  extern "C" __global__ void paged_decode_reduce_##SUFFIX(                                       \
      T* out, const float* part_max, const float* part_sum, const float* part_out,               \
      const uint32_t* query_starts, const uint32_t* context_lens, int heads, int head_dim,       \
      int partition, int parts) {                                                                \
    paged_decode_reduce_impl<T>(out, part_max, part_sum, part_out, query_starts, context_lens,   \
                                heads, head_dim, partition, parts);                              \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(PREFILL_THREADS) paged_prefill_##SUFFIX(          \
      T* out, const T* q, const T* k_cache, const T* v_cache, const uint32_t* block_tables,      \
      const uint32_t* query_starts, const uint32_t* context_lens, const uint32_t* tiles,         \
      int heads, int kv_heads, int head_dim, int block_size, int max_blocks, float scale) {      \
    paged_prefill_impl<T>(out, q, k_cache, v_cache, block_tables, query_starts, context_lens,    \
                          tiles, heads, kv_heads, head_dim, block_size, max_blocks, scale);      \
  }
FOR_EACH_DTYPE(ENTRY)
