// The launch sequences of select, pairwise_distance and select_varlen, generic over how a kernel is
// launched: `launch(name, kernel, grid, block, args...)` is a CUDA launch on the
// current stream in divprune_cuda.cu and a run on the host SIMT runtime in the
// tests, so both execute exactly this sequence with the grids of LaunchPlan.
#pragma once

#include "kernels/distance_tiles.cuh"
#include "kernels/greedy_select.cuh"
#include "kernels/launch_plan.h"
#include "kernels/row_norms.cuh"
#include "kernels/segment_table.cuh"

#include <type_traits>
#include <utility>

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

// Calls f(Kernel<scalar_t, Core>{}) for the dtype and the core the plan chose.
template <typename scalar_t, typename Core>
struct Kernel {
  using scalar = scalar_t;
  using core = Core;
};

template <typename F>
void with_core(DType dtype, TileCore core, F&& f) {
  const bool tensor_cores = core == TileCore::TensorCore;
  switch (dtype) {
    case DType::Float32:
      f(Kernel<float, FmaCore<float>>{});
      break;
    case DType::Float16:
      if (tensor_cores) f(Kernel<__half, TensorCoreCore<__half>>{});
      else f(Kernel<__half, FmaCore<__half>>{});
      break;
    case DType::BFloat16:
      if (tensor_cores) f(Kernel<__nv_bfloat16, TensorCoreCore<__nv_bfloat16>>{});
      else f(Kernel<__nv_bfloat16, FmaCore<__nv_bfloat16>>{});
      break;
  }
}

// Calls f(std::integral_constant<int, width>{}) for the plan's greedy width (1, 2,
// 4, ..., 64); the caller has checked that the width is not 0.
template <int kItems = 1, typename F>
void with_greedy_width(int width, F&& f) {
  if (width == kItems) {
    f(std::integral_constant<int, kItems>{});
  } else if constexpr (kItems < kMaxCandidatesPerThread) {
    with_greedy_width<kItems * 2>(width, std::forward<F>(f));
  }
}

template <typename Launch, typename scalar_t>
void launch_row_norms(Launch& launch, const LaunchPlan& plan, const scalar_t* x, int64_t total_rows, int64_t dim,
                      const DistanceBuffers& buf) {
  launch("row_norms_kernel", row_norms_kernel<scalar_t>, dim3(plan.norm_blocks), dim3(kNormThreads), x, total_rows,
         dim, buf.inv_norm, buf.row_min_bits, buf.split_counters, plan.splits > 1 ? plan.tile_slots : int64_t(0));
}

// select / pairwise_distance: row norms, then the distance tiles of a (B, M, D)
// batch, in as many tile launches as grid z needs.
template <typename Launch>
void launch_distances(Launch& launch, const LaunchPlan& plan, DType dtype, int64_t batch, int64_t rows,
                      int64_t dim, const DistanceBuffers& buf) {
  with_core(dtype, plan.core, [&](auto kernel) {
    using scalar_t = typename decltype(kernel)::scalar;
    using Core = typename decltype(kernel)::core;
    const auto* x = static_cast<const scalar_t*>(buf.x);
    launch_row_norms(launch, plan, x, batch * rows, dim, buf);
    for (int64_t batch0 = 0; batch0 < batch; batch0 += plan.items_per_launch) {
      const int64_t items = std::min(plan.items_per_launch, batch - batch0);
      const dim3 grid(plan.tiles_per_side, plan.tiles_per_side, items * plan.splits);
      launch("distance_tile_kernel", distance_tile_kernel<scalar_t, Core>, grid, dim3(Core::kThreads), x, rows,
             dim, batch0, plan.splits, buf.inv_norm, buf.dist, buf.row_min_bits, buf.partials, buf.split_counters);
    }
  });
}

// The greedy selection of k indices per item from the distances and row minima.
template <typename Launch>
void launch_greedy(Launch& launch, const LaunchPlan& plan, int64_t batch, int64_t rows, int64_t k,
                   const float* dist, const uint32_t* row_min_bits, int64_t* out) {
  with_greedy_width(plan.greedy_width, [&](auto width) {
    launch("greedy_select_kernel", greedy_select_kernel<decltype(width)::value>, dim3(batch),
           dim3(plan.greedy_threads), dist, row_min_bits, int(rows), int(k), out);
  });
}

// select_varlen's segment table (segment_table_values) into `table` on the device,
// kTableChunkValues values per launch.
template <typename Launch>
void launch_segment_table(Launch& launch, const std::vector<int64_t>& values, int64_t* table) {
  for (size_t first = 0; first < values.size(); first += kTableChunkValues) {
    TableChunk chunk{};
    chunk.first = int64_t(first);
    chunk.count = int64_t(std::min<size_t>(kTableChunkValues, values.size() - first));
    std::copy(values.begin() + first, values.begin() + first + chunk.count, chunk.values);
    launch("segment_table_kernel", segment_table_kernel, dim3(1), dim3(kTableThreads), chunk, table);
  }
}

// select_varlen: row norms of all N rows, then one tile launch over every segment's
// tiles (buf.dist is the packed sum n_i^2 workspace), then one greedy launch with a
// CTA per segment: three launches whatever the number of segments, after the table's
// (launch_segment_table). `table` views that table in device memory.
template <typename Launch>
void launch_varlen(Launch& launch, const LaunchPlan& plan, DType dtype, int64_t total_rows, int64_t dim,
                   const SegmentTable& table, const DistanceBuffers& buf, int64_t* out) {
  with_core(dtype, plan.core, [&](auto kernel) {
    using scalar_t = typename decltype(kernel)::scalar;
    using Core = typename decltype(kernel)::core;
    const auto* x = static_cast<const scalar_t*>(buf.x);
    launch_row_norms(launch, plan, x, total_rows, dim, buf);
    launch("varlen_distance_tile_kernel", varlen_distance_tile_kernel<scalar_t, Core>,
           dim3(unsigned(plan.tiles), 1, plan.splits), dim3(Core::kThreads), x, dim, table, plan.splits,
           buf.inv_norm, buf.dist, buf.row_min_bits, buf.partials, buf.split_counters);
  });
  with_greedy_width(plan.greedy_width, [&](auto width) {
    launch("varlen_greedy_select_kernel", varlen_greedy_select_kernel<decltype(width)::value>,
           dim3(unsigned(table.segments)), dim3(plan.greedy_threads), buf.dist, buf.row_min_bits, table, out);
  });
}

}  // namespace kernels
}  // namespace divprune
