// Kernel 3: the greedy max-min selection, one CTA per batch item (select) or per
// segment (select_varlen: all segments at once, the block sized for the largest).
//
// Thread t owns candidates t, t + blockDim, ... (kItems of them, coalesced row
// reads); their running minimum distances to the picked set live in registers.
// Each step streams the newest pick's row of the distance matrix, updates the
// minima, and picks with one block-wide argmax (lowest index on ties).
#pragma once

#include "kernels/common.cuh"

namespace divprune {
namespace kernels {

// Key order = (score, then lower index): the max key is the argmax with ties
// to the lowest index; -0 and +0 must tie. Scores are never a positive NaN: a NaN
// row minimum decodes as the lowest key (min_key), and the running minima skip NaN
// distances, as the CPU op does, so a corrupt input still yields distinct indices.
__device__ __forceinline__ uint64_t candidate_key(float score, int index) {
  if (score == 0.f) score = 0.f;
  return (uint64_t(ordered_bits(score)) << 32) | uint32_t(~uint32_t(index));
}

__device__ __forceinline__ int key_index(uint64_t key) { return int(~uint32_t(key)); }

__device__ __forceinline__ uint64_t max_key(uint64_t a, uint64_t b) { return a > b ? a : b; }

// Per-warp maxima, double-buffered (see block_max).
struct GreedyShared {
  uint64_t slots[2][32];
};

// Block-wide max of `key`, known to every thread: a shuffle max in each warp, lane
// 0 of warp w writes slot w, one barrier, then every warp reduces the slots.
// `parity` alternates per call so one barrier suffices: slots[parity] is rewritten
// two calls later, after the next call's barrier, when every warp has read it.
__device__ __forceinline__ uint64_t block_max(uint64_t key, uint64_t (*slots)[32], int parity) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warps = blockDim.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) key = max_key(key, __shfl_xor_sync(0xFFFFFFFFu, key, offset));
  if (lane == 0) slots[parity][warp] = key;
  __syncthreads();
  key = lane < warps ? slots[parity][lane] : 0;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) key = max_key(key, __shfl_xor_sync(0xFFFFFFFFu, key, offset));
  return key;
}

// One CTA selects k of an item's `rows` candidates: `item_dist` is its rows x rows
// matrix, `item_row_min` its row minima; pick p is written as index_base + p.
// Valid keys are never 0, so 0 marks "nothing to offer". Indices fit in int32
// (M <= 1024 * kMaxCandidatesPerThread), which keeps the per-item state in registers.
template <int kItems>
__device__ void select_greedy(const float* __restrict__ item_dist, const uint32_t* __restrict__ item_row_min,
                              int rows, int k, int64_t index_base, int64_t* __restrict__ item_out) {
  uint64_t(*slots)[32] = shared_storage<GreedyShared>().slots;
  float min_distance[kItems];
  uint64_t picked = 0;  // bit n: candidate threadIdx.x + n * blockDim.x is taken

  // First pick: the row whose minimum distance to the other rows is largest.
  uint64_t key = 0;
#pragma unroll
  for (int n = 0; n < kItems; ++n) {
    const int i = threadIdx.x + n * blockDim.x;
    min_distance[n] = INFINITY;
    if (i < rows) key = max_key(key, candidate_key(from_ordered_bits(item_row_min[i]), i));
  }
  int pick = key_index(block_max(key, slots, 0));

  for (int step = 0;; ++step) {
    if (threadIdx.x == 0) item_out[step] = index_base + pick;
    if (step + 1 == k) break;
    const float* pick_row = item_dist + int64_t(pick) * rows;
    key = 0;
#pragma unroll
    for (int n = 0; n < kItems; ++n) {
      const int i = threadIdx.x + n * blockDim.x;
      if (i == pick) picked |= uint64_t(1) << n;
      if (i < rows) {
        const float d = pick_row[i];
        const float m = d < min_distance[n] ? d : min_distance[n];  // ignores NaN, as the CPU op does
        min_distance[n] = m;
        if (!(picked >> n & 1)) key = max_key(key, candidate_key(m, i));
      }
    }
    pick = key_index(block_max(key, slots, (step + 1) & 1));
  }
}

// select: grid x = batch item; picks are the item's local indices.
template <int kItems>
__global__ void __launch_bounds__(kMaxGreedyThreads)
    greedy_select_kernel(const float* __restrict__ dist, const uint32_t* __restrict__ row_min_bits,
                         int rows, int k, int64_t* __restrict__ out) {
  const int64_t item = blockIdx.x;
  select_greedy<kItems>(dist + item * rows * rows, row_min_bits + item * rows, rows, k, 0, out + item * k);
}

// select_varlen: grid x = segment; picks are rows of the packed x (local pick plus
// the segment's first row), written at the segment's place in the output.
template <int kItems>
__global__ void __launch_bounds__(kMaxGreedyThreads)
    varlen_greedy_select_kernel(const float* __restrict__ dist, const uint32_t* __restrict__ row_min_bits,
                                SegmentTable table, int64_t* __restrict__ out) {
  const int64_t segment = blockIdx.x;
  const int64_t first_row = table.row_start[segment];
  const int rows = int(table.row_start[segment + 1] - first_row);
  const int k = int(table.pick_start[segment + 1] - table.pick_start[segment]);
  select_greedy<kItems>(dist + table.dist_start[segment], row_min_bits + first_row, rows, k, first_row,
                        out + table.pick_start[segment]);
}

}  // namespace kernels
}  // namespace divprune
