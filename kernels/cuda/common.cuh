// Helpers shared by liftoff's kernels: dtype conversion and warp reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <float.h>
#include <stdint.h>

#define WARP_SIZE 32
#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

// Sum / max over the `width` lanes of a (sub-)warp; every lane gets the result.
__device__ __forceinline__ float group_sum(float v, int width) {
  for (int o = width / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o, width);
  return v;
}
__device__ __forceinline__ float group_max(float v, int width) {
  for (int o = width / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o, width));
  return v;
}

// Instantiates `extern "C"` entry points NAME_f32 / NAME_f16 / NAME_bf16 of a templated kernel
// body `NAME##_impl<T>(ARGS...)`.
#define FOR_EACH_DTYPE(M) \
  M(float, f32)           \
  M(__half, f16)          \
  M(__nv_bfloat16, bf16)
