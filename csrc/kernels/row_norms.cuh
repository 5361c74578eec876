// Kernel 1: inverse L2 norm of every row.
#pragma once

#include "kernels/common.cuh"

namespace divprune {
namespace kernels {

// One warp per row: lanes stride over the features, then a shuffle sum (float32).
// Zero rows get 1/eps like F.normalize, so their distance is 1 to everything.
// The kernel also resets the per-row minima (the tile kernel folds into them with
// atomicMin) and the split-D arrival counters, which saves two memset launches.
template <typename scalar_t>
__global__ void row_norms_kernel(const scalar_t* __restrict__ x, int64_t total_rows, int64_t dim,
                                 float* __restrict__ inv_norm, uint32_t* __restrict__ row_min_bits,
                                 int* __restrict__ split_counters, int64_t num_counters) {
  const int64_t thread = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t c = thread; c < num_counters; c += int64_t(gridDim.x) * blockDim.x) split_counters[c] = 0;

  const int64_t row = thread / 32;
  const int lane = threadIdx.x % 32;
  if (row >= total_rows) return;  // whole warps: blockDim is a multiple of 32
  const scalar_t* xr = x + row * dim;
  float sum_sq = 0.f;
  for (int64_t d = lane; d < dim; d += 32) {
    const float v = to_float(xr[d]);
    sum_sq = fmaf(v, v, sum_sq);
  }
  sum_sq = warp_sum(sum_sq);
  if (lane == 0) {
    inv_norm[row] = 1.0f / fmaxf(sqrtf(sum_sq), 1e-12f);
    row_min_bits[row] = kOrderedPlusInf;
  }
}

}  // namespace kernels
}  // namespace divprune
