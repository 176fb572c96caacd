// Sampling on the GPU: one CTA per logits row turns the row into one token id (and the top-n
// log-probabilities when asked), so only a few bytes per row go back to the host.
//
// Per row, in this order (the CPU implementation in src/sampling.rs follows it exactly):
//  1. top-n log-probabilities of the raw logits, ordered by (value desc, id asc); a forced row
//     (teacher forcing of a prompt token, uparam 3 != 0xffffffff) stops here: its token is the
//     forced one, with that token's log-probability in the raw distribution;
//  2. repetition penalty on the listed tokens (x / p if x > 0, x * p otherwise), then the
//     additive adjustments (OpenAI's frequency/presence penalties and logit_bias), then the
//     listed banned tokens (no-repeat n-grams, EOS before min_new_tokens) set to -inf, and for
//     a constrained row every token its bitmask does not allow;
//  3. temperature 0: the arg max (lowest id on ties);
//  4. otherwise p_i = exp((x_i - max) / T) restricted to keys >= the top-k threshold (the k-th
//     largest value, ties kept) and >= the top-p threshold (the largest value whose tail
//     holds top_p of the mass); thresholds are found exactly by a 32-step bitwise search over
//     order-preserving integer keys of the floats;
//  5. the token is where the running sum over ids in increasing order reaches u * sum(p) for
//     the row's uniform draw u (drawn on the host from the request's seed and step); should
//     rounding leave the target unreached, the arg max.
// The chosen token's log-probability (when asked for) is of the raw distribution: a token the
// penalty or an adjustment changed reports the logit saved before it was changed.
#include "common.cuh"

#define SAMPLE_THREADS 256
#define SAMPLE_WARPS (SAMPLE_THREADS / WARP_SIZE)
#define MAX_LOGPROBS 20

// Order-preserving map of a float to an unsigned key (NaN is treated as -inf by the caller).
__device__ __forceinline__ uint32_t key_of(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ float block_sum(float v, float* red) {
  v = group_sum(v, WARP_SIZE);
  const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float s = 0.f;
  for (int w = 0; w < SAMPLE_WARPS; w++) s += red[w];
  return s;
}

__device__ float block_max(float v, float* red) {
  v = group_max(v, WARP_SIZE);
  const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float m = -INFINITY;
  for (int w = 0; w < SAMPLE_WARPS; w++) m = fmaxf(m, red[w]);
  return m;
}

__device__ uint32_t block_min_u32(uint32_t v, uint32_t* red) {
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(FULL_MASK, v, o));
  const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  uint32_t m = 0xffffffffu;
  for (int w = 0; w < SAMPLE_WARPS; w++) m = min(m, red[w]);
  return m;
}

// Whether (v, i) comes before (bv, bi) in (value desc, id asc) order.
__device__ __forceinline__ bool before(float v, uint32_t i, float bv, uint32_t bi) {
  return v > bv || (v == bv && i < bi);
}

// The first element in (value desc, id asc) order strictly after (pv, pi) (pass pv = +inf,
// pi = 0 for the very first). Returns its id (0xffffffff if none).
__device__ uint32_t block_next(const float* x, int vocab, float pv, uint32_t pi, float* fred,
                               uint32_t* ured, float* out_v) {
  float bv = -INFINITY;
  uint32_t bi = 0xffffffffu;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = x[i];
    const bool after = v < pv || (v == pv && (uint32_t)i > pi);
    if (after && before(v, i, bv, bi)) {
      bv = v;
      bi = i;
    }
  }
  const float m = block_max(bv, fred);
  const uint32_t id = block_min_u32(bv == m ? bi : 0xffffffffu, ured);
  *out_v = m;
  return id;
}

// A token's logit before the penalty and the adjustments: its saved raw value if the row
// penalised it, else if the row adjusted it (the adjust pass runs after the penalty pass, so
// only an adjusted token the penalty left alone has its raw value in adj_raw), else x[token].
__device__ float raw_logit(const float* x, const uint32_t* pen_ids, const float* pen_raw,
                           uint32_t pen_begin, uint32_t pen_end, const uint32_t* adj_ids,
                           const float* adj_raw, uint32_t adj_begin, uint32_t adj_end,
                           uint32_t token) {
  for (uint32_t j = pen_begin; j < pen_end; j++)
    if (pen_ids[j] == token) return pen_raw[j];
  for (uint32_t j = adj_begin; j < adj_end; j++)
    if (adj_ids[j] == token) return adj_raw[j];
  return x[token];
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_rows(
    float* __restrict__ logits, int vocab, const float* __restrict__ fparams,
    const uint32_t* __restrict__ uparams, const uint32_t* __restrict__ pen_off,
    const uint32_t* __restrict__ pen_ids, const uint32_t* __restrict__ adj_off,
    const uint32_t* __restrict__ adj_ids, const float* __restrict__ adj_vals,
    const uint32_t* __restrict__ ban_off, const uint32_t* __restrict__ ban_ids,
    const uint32_t* __restrict__ mask_off, const uint32_t* __restrict__ mask_words,
    uint32_t* __restrict__ tokens, uint32_t* __restrict__ top_ids, float* __restrict__ top_lp,
    float* __restrict__ pen_raw, float* __restrict__ adj_raw, float* __restrict__ token_lp) {
  __shared__ float fred[SAMPLE_WARPS];
  __shared__ uint32_t ured[SAMPLE_WARPS];
  const int row = blockIdx.x;
  float* x = logits + (size_t)row * vocab;
  const float temperature = fparams[row * 4], top_p = fparams[row * 4 + 1];
  const float penalty = fparams[row * 4 + 2], uniform = fparams[row * 4 + 3];
  const uint32_t top_k = uparams[row * 4], n_logprobs = min(uparams[row * 4 + 1], MAX_LOGPROBS);
  const bool want_token_lp = uparams[row * 4 + 2] != 0;
  const uint32_t force = uparams[row * 4 + 3];  // 0xffffffff: sample

  for (int i = threadIdx.x; i < vocab; i += blockDim.x)
    if (isnan(x[i])) x[i] = -INFINITY;
  __syncthreads();

  // 1. Log-probabilities of the raw distribution.
  float lse = 0.f;
  if (n_logprobs > 0 || want_token_lp) {
    float m = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, x[i]);
    m = block_max(m, fred);
    float z = 0.f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) z += expf(x[i] - m);
    lse = m + logf(block_sum(z, fred));
  }
  if (n_logprobs > 0) {
    float pv = INFINITY;
    uint32_t pi = 0;
    for (uint32_t r = 0; r < n_logprobs; r++) {
      float v;
      const uint32_t id = block_next(x, vocab, pv, pi, fred, ured, &v);
      if (threadIdx.x == 0) {
        top_ids[row * MAX_LOGPROBS + r] = id;
        top_lp[row * MAX_LOGPROBS + r] = v - lse;
      }
      pv = v;
      pi = id;
    }
  }
  // A forced row: nothing is modified or drawn (the whole CTA returns here).
  if (force != 0xffffffffu) {
    if (threadIdx.x == 0) {
      tokens[row] = force;
      if (want_token_lp) token_lp[row] = x[force] - lse;
    }
    return;
  }

  // 2. Penalties, then adjustments, then bans (each list holds distinct ids; a token may be
  // in several lists, hence the barriers between the passes).
  __syncthreads();
  for (uint32_t j = pen_off[row] + threadIdx.x; j < pen_off[row + 1]; j += blockDim.x) {
    const uint32_t t = pen_ids[j];
    const float v = x[t];
    pen_raw[j] = v;  // the raw logit, for the chosen token's log-probability
    x[t] = v > 0.f ? v / penalty : v * penalty;
  }
  __syncthreads();
  for (uint32_t j = adj_off[row] + threadIdx.x; j < adj_off[row + 1]; j += blockDim.x) {
    const uint32_t t = adj_ids[j];
    const float v = x[t];
    adj_raw[j] = v;  // raw unless penalised (raw_logit then reads pen_raw first)
    x[t] = v + adj_vals[j];
  }
  __syncthreads();
  for (uint32_t j = ban_off[row] + threadIdx.x; j < ban_off[row + 1]; j += blockDim.x)
    x[ban_ids[j]] = -INFINITY;
  // A constrained row's bitmask (bit t % 32 of word t / 32; tokens past its end are out).
  const uint32_t m0 = mask_off[row], m1 = mask_off[row + 1];
  if (m1 > m0) {
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const uint32_t w = m0 + ((uint32_t)i >> 5);
      if (w >= m1 || ((mask_words[w] >> (i & 31)) & 1u) == 0u) x[i] = -INFINITY;
    }
  }
  __syncthreads();

  // 3. The arg max (also the answer when nothing can be sampled).
  float best;
  const uint32_t arg = block_next(x, vocab, INFINITY, 0, fred, ured, &best);
  if (temperature <= 0.f || best == -INFINITY) {
    if (threadIdx.x == 0) {
      tokens[row] = arg;
      if (want_token_lp)
        token_lp[row] = raw_logit(x, pen_ids, pen_raw, pen_off[row], pen_off[row + 1], adj_ids,
                                  adj_raw, adj_off[row], adj_off[row + 1], arg) - lse;
    }
    return;
  }

  // 4. Thresholds over integer keys: keep key >= thresh.
  const float inv_t = 1.f / temperature;
  uint32_t thresh = 0;
  if (top_k > 0 && top_k < (uint32_t)vocab) {
    uint32_t k = 0;
    for (int bit = 31; bit >= 0; bit--) {
      const uint32_t cand = k | (1u << bit);
      float c = 0.f;
      for (int i = threadIdx.x; i < vocab; i += blockDim.x) c += key_of(x[i]) >= cand ? 1.f : 0.f;
      if (block_sum(c, fred) >= (float)top_k) k = cand;
    }
    thresh = k;
  }
  if (top_p < 1.f) {
    float z = 0.f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
      if (key_of(x[i]) >= thresh) z += expf((x[i] - best) * inv_t);
    const float need = top_p * block_sum(z, fred);
    uint32_t k = 0;
    for (int bit = 31; bit >= 0; bit--) {
      const uint32_t cand = k | (1u << bit);
      const uint32_t floor_key = max(cand, thresh);
      float s = 0.f;
      for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        if (key_of(x[i]) >= floor_key) s += expf((x[i] - best) * inv_t);
      if (block_sum(s, fred) >= need) k = cand;
    }
    thresh = max(thresh, k);
  }

  // 5. Inverse CDF in id order.
  float z = 0.f;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x)
    if (x[i] != -INFINITY && key_of(x[i]) >= thresh) z += expf((x[i] - best) * inv_t);
  const float target = uniform * block_sum(z, fred);
  __shared__ float scan[SAMPLE_THREADS];
  float running = 0.f;
  uint32_t chosen = 0xffffffffu;
  for (int base = 0; base < vocab; base += blockDim.x) {
    const int i = base + threadIdx.x;
    float p = 0.f;
    if (i < vocab && x[i] != -INFINITY && key_of(x[i]) >= thresh) p = expf((x[i] - best) * inv_t);
    __syncthreads();
    scan[threadIdx.x] = p;
    __syncthreads();
    for (int off = 1; off < SAMPLE_THREADS; off <<= 1) {
      const float add = threadIdx.x >= off ? scan[threadIdx.x - off] : 0.f;
      __syncthreads();
      scan[threadIdx.x] += add;
      __syncthreads();
    }
    const float incl = running + scan[threadIdx.x];
    const uint32_t hit = (p > 0.f && incl >= target) ? (uint32_t)i : 0xffffffffu;
    const uint32_t first = block_min_u32(hit, ured);
    running += scan[SAMPLE_THREADS - 1];
    if (first != 0xffffffffu) {
      chosen = first;
      break;
    }
  }
  // Rounding can leave the target a hair above the total: the arg max (always kept) then.
  if (threadIdx.x == 0) {
    const uint32_t token = chosen != 0xffffffffu ? chosen : arg;
    tokens[row] = token;
    if (want_token_lp)
      token_lp[row] = raw_logit(x, pen_ids, pen_raw, pen_off[row], pen_off[row + 1], adj_ids,
                                adj_raw, adj_off[row], adj_off[row + 1], token) - lse;
  }
}
