// Device helpers shared by the kernels. No ATen: the kernel headers compile with
// nvcc for the GPU, and with a host C++ compiler on top of the SIMT runtime in
// csrc/simt/, which runs the same source on the CPU in the tests.
#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#else
#include "simt/simt.h"
#endif

#include <cstdint>

#include "kernels/launch_plan.h"

namespace divprune {
namespace kernels {

#if defined(__CUDACC__)
// A CTA's shared memory: one T per kernel and type. The host runtime gives every
// CTA a fresh, poisoned, bounds-checked T instead.
template <typename T>
__device__ __forceinline__ T& shared_storage() {
  __shared__ T storage;
  return storage;
}
#else
using simt::shared_storage;
#endif

constexpr uint32_t kOrderedPlusInf = 0xFF800000u;  // ordered_bits(+inf)

// Maps floats to unsigned ints with the same order, so atomicMin works on them.
__device__ __forceinline__ uint32_t ordered_bits(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float from_ordered_bits(uint32_t u) {
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u);
}

// Row minima are kept as ordered bits with NaN below everything (0 decodes to a
// NaN): a NaN distance makes the row's minimum NaN, as torch's min/amax do on the
// CPU, and the greedy kernel ranks that row last.
__device__ __forceinline__ uint32_t min_key(float f) { return isnan(f) ? 0u : ordered_bits(f); }

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T warp_min(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = min(v, __shfl_xor_sync(0xFFFFFFFFu, v, offset));
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
  return v;
}

}  // namespace kernels
}  // namespace divprune
