// The launch sequence of select / pairwise_distance, generic over how a kernel is
// launched: `launch(name, kernel, grid, block, args...)` is a CUDA launch on the
// current stream in divprune_cuda.cu and a run on the host SIMT runtime in the
// tests, so both execute exactly this sequence with the grids of LaunchPlan.
#pragma once

#include "kernels/distance_tiles.cuh"
#include "kernels/greedy_select.cuh"
#include "kernels/launch_plan.h"
#include "kernels/row_norms.cuh"

namespace divprune {
namespace kernels {

struct DistanceBuffers {
  const void* x;           // (B, M, D) contiguous, of the plan's dtype
  float* inv_norm;         // (B, M)
  float* dist;             // (B, M, M) out
  uint32_t* row_min_bits;  // (B, M) out: min_key of each row's distance to the other rows
  float* partials;         // split-D workspace (split_workspace_floats), or null when splits == 1
  int* split_counters;     // plan.tile_slots arrival counters, or null when splits == 1
};

inline int64_t split_workspace_floats(const LaunchPlan& plan) {
  return plan.splits > 1 ? plan.tile_slots * plan.splits * kTile * kTile : 0;
}

template <typename scalar_t, typename Core, typename Launch>
void launch_distance_kernels(Launch& launch, const LaunchPlan& plan, int64_t batch, int64_t rows, int64_t dim,
                             const DistanceBuffers& buf) {
  const auto* x = static_cast<const scalar_t*>(buf.x);
  launch("row_norms_kernel", row_norms_kernel<scalar_t>, dim3(plan.norm_blocks), dim3(kNormThreads), x,
         batch * rows, dim, buf.inv_norm, buf.row_min_bits, buf.split_counters,
         plan.splits > 1 ? plan.tile_slots : int64_t(0));
  for (int64_t batch0 = 0; batch0 < batch; batch0 += plan.items_per_launch) {
    const int64_t items = std::min(plan.items_per_launch, batch - batch0);
    const dim3 grid(plan.tiles_per_side, plan.tiles_per_side, items * plan.splits);
    launch("distance_tile_kernel", distance_tile_kernel<scalar_t, Core>, grid, dim3(Core::kThreads), x, rows, dim,
           batch0, plan.splits, buf.inv_norm, buf.dist, buf.row_min_bits, buf.partials, buf.split_counters);
  }
}

// Row norms, then the distance tiles, with the core the plan chose for the dtype.
template <typename Launch>
void launch_distances(Launch& launch, const LaunchPlan& plan, DType dtype, int64_t batch, int64_t rows,
                      int64_t dim, const DistanceBuffers& buf) {
  const bool tensor_cores = plan.core == TileCore::TensorCore;
  switch (dtype) {
    case DType::Float32:
      launch_distance_kernels<float, FmaCore<float>>(launch, plan, batch, rows, dim, buf);
      break;
    case DType::Float16:
      if (tensor_cores) launch_distance_kernels<__half, TensorCoreCore<__half>>(launch, plan, batch, rows, dim, buf);
      else launch_distance_kernels<__half, FmaCore<__half>>(launch, plan, batch, rows, dim, buf);
      break;
    case DType::BFloat16:
      if (tensor_cores) {
        launch_distance_kernels<__nv_bfloat16, TensorCoreCore<__nv_bfloat16>>(launch, plan, batch, rows, dim, buf);
      } else {
        launch_distance_kernels<__nv_bfloat16, FmaCore<__nv_bfloat16>>(launch, plan, batch, rows, dim, buf);
      }
      break;
  }
}

// The greedy selection of k indices per item from the distances and row minima,
// with the kernel instantiated for plan.greedy_width (1, 2, 4, ..., 64); the caller
// has checked that the width is not 0.
template <int kItems = 1, typename Launch>
void launch_greedy(Launch& launch, const LaunchPlan& plan, int64_t batch, int64_t rows, int64_t k,
                   const float* dist, const uint32_t* row_min_bits, int64_t* out) {
  if (plan.greedy_width != kItems) {
    if constexpr (kItems < kMaxCandidatesPerThread) {
      launch_greedy<kItems * 2>(launch, plan, batch, rows, k, dist, row_min_bits, out);
    }
    return;
  }
  launch("greedy_select_kernel", greedy_select_kernel<kItems>, dim3(batch), dim3(plan.greedy_threads), dist,
         row_min_bits, int(rows), int(k), out);
}

}  // namespace kernels
}  // namespace divprune
