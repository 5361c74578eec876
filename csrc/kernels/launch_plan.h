// How the CUDA kernels are launched for one problem: plain C++, no CUDA or ATen,
// so the CUDA launcher (divprune_cuda.cu) and the host SIMT runtime (csrc/simt/)
// take their grids, split counts and greedy widths from the same function.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace divprune {
namespace kernels {

constexpr int kTile = 64;  // Gram tile edge, rows and columns
// The D reduction runs in chunks of this many features, each summed from zero and
// then added to the tile's total in chunk order, whether the chunks run in one CTA
// or in separate CTAs (split-D). The order depends on D alone, so an item's
// distances are the same bits whatever the batch size or the SM count (for one
// GPU architecture and build: the core, and tensor-core rounding, may differ).
constexpr int64_t kChunkFeatures = 256;
// The greedy kernel keeps up to this many candidates per thread in registers.
constexpr int kMaxCandidatesPerThread = 64;
constexpr int kMaxGreedyThreads = 1024;
constexpr int64_t kMaxGridZ = 65535;
constexpr int kNormThreads = 256;  // one warp per row

enum class DType { Float32, Float16, BFloat16 };
enum class TileCore { Fma, TensorCore };

// What the launcher knows about the device.
struct DeviceLimits {
  int multiprocessors = 1;
  // The PTX version (x10) the tensor-core kernel was compiled for, as loaded on this
  // device: below 80 its tensor-core branch is compiled out (see TensorCoreCore).
  int tensor_core_ptx_version = 0;
  int max_greedy_threads = kMaxGreedyThreads;  // smaller values reach the wide greedy paths at small M
  int64_t max_grid_z = kMaxGridZ;  // smaller values spread small batches over several tile launches
};

struct LaunchPlan {
  // Row norms: one warp per row.
  int64_t norm_blocks = 0;
  // Distance tiles: grid (tiles_per_side, tiles_per_side, items_per_launch * splits).
  TileCore core = TileCore::Fma;
  int64_t tiles_per_side = 0;
  int64_t tiles = 0;       // upper-triangular tiles over the whole batch
  int64_t tile_slots = 0;  // batch * tiles_per_side^2: split counters and workspace index
  int64_t chunks = 0;      // ceil(D / kChunkFeatures)
  int splits = 1;          // 1: a CTA folds all chunks; else one CTA per chunk (splits == chunks)
  int64_t items_per_launch = 0;
  // Greedy selection: one CTA per item, `greedy_width` candidates per thread.
  int greedy_threads = 0;
  int greedy_width = 0;  // 1, 2, 4, ..., 64; 0 when M is beyond the greedy kernel
};

inline bool has_tensor_cores(const DeviceLimits& device) { return device.tensor_core_ptx_version >= 80; }

// Candidates per greedy thread, rounded up to a power of two (the kernel's template
// widths); 0 if more than kMaxCandidatesPerThread are needed.
inline int greedy_width_for(int64_t rows, int64_t threads) {
  const int64_t per_thread = (rows + threads - 1) / threads;
  int width = 1;
  while (width < per_thread) width *= 2;
  return width <= kMaxCandidatesPerThread ? width : 0;
}

inline int64_t tiles_per_side(int64_t rows) { return (rows + kTile - 1) / kTile; }
inline int64_t upper_tiles(int64_t rows) { return tiles_per_side(rows) * (tiles_per_side(rows) + 1) / 2; }

// The parts of a plan shared by select and select_varlen: the core, the split-D
// decision from the number of upper-triangular tiles, and the greedy block from the
// largest item (`max_rows`).
inline void plan_common(LaunchPlan& plan, int64_t total_rows, int64_t max_rows, int64_t dim, DType dtype,
                        const DeviceLimits& device) {
  plan.norm_blocks = std::max<int64_t>((total_rows * 32 + kNormThreads - 1) / kNormThreads, 1);
  plan.core = dtype != DType::Float32 && has_tensor_cores(device) ? TileCore::TensorCore : TileCore::Fma;
  plan.chunks = (dim + kChunkFeatures - 1) / kChunkFeatures;
  // Too few tiles for two per multiprocessor: give every chunk its own CTA.
  const bool split =
      plan.chunks > 1 && plan.chunks <= device.max_grid_z && plan.tiles < 2 * int64_t(device.multiprocessors);
  plan.splits = split ? int(plan.chunks) : 1;
  const int64_t warps_needed = (max_rows + 31) / 32;
  plan.greedy_threads = int(std::min<int64_t>(warps_needed * 32, device.max_greedy_threads));
  plan.greedy_width = greedy_width_for(max_rows, plan.greedy_threads);
}

inline LaunchPlan make_launch_plan(int64_t batch, int64_t rows, int64_t dim, DType dtype,
                                   const DeviceLimits& device) {
  LaunchPlan plan;
  plan.tiles_per_side = tiles_per_side(rows);
  plan.tiles = batch * upper_tiles(rows);
  plan.tile_slots = batch * plan.tiles_per_side * plan.tiles_per_side;
  plan_common(plan, batch * rows, rows, dim, dtype, device);
  plan.items_per_launch = device.max_grid_z / plan.splits;
  return plan;
}

// select_varlen's segments as the kernels see them: four prefix sums of B + 1 entries
// each, one array on the device. Segment s has rows [row_start[s], row_start[s+1]) of
// x, writes its picks to [pick_start[s], pick_start[s+1]) of the output, its n x n
// distances at dist_start[s] of the packed workspace (only diagonal blocks: sum n^2
// floats), and owns the upper-triangular tiles [tile_start[s], tile_start[s+1]) of
// the one tile launch.
struct SegmentTable {
  const int64_t* row_start;
  const int64_t* pick_start;
  const int64_t* dist_start;
  const int64_t* tile_start;
  int64_t segments;
};

// The table's contents, built on the host from the lengths and k (both known there:
// no device sync). The caller checked that they are valid.
inline std::vector<int64_t> segment_table_values(const std::vector<int64_t>& rows,
                                                 const std::vector<int64_t>& picks) {
  const size_t b = rows.size();
  std::vector<int64_t> values(4 * (b + 1), 0);
  int64_t* row_start = values.data();
  int64_t* pick_start = row_start + b + 1;
  int64_t* dist_start = pick_start + b + 1;
  int64_t* tile_start = dist_start + b + 1;
  for (size_t s = 0; s < b; ++s) {
    row_start[s + 1] = row_start[s] + rows[s];
    pick_start[s + 1] = pick_start[s] + picks[s];
    dist_start[s + 1] = dist_start[s] + rows[s] * rows[s];
    tile_start[s + 1] = tile_start[s] + upper_tiles(rows[s]);
  }
  return values;
}

inline SegmentTable segment_table_view(const int64_t* values, int64_t segments) {
  return {values, values + (segments + 1), values + 2 * (segments + 1), values + 3 * (segments + 1), segments};
}

// select_varlen's plan: one tile launch over every segment's upper-triangular tiles
// (grid x), split-D decided by their total, split counters and workspace indexed by
// the launch's tile index, and one greedy CTA per segment sized for the largest.
inline LaunchPlan make_varlen_launch_plan(const std::vector<int64_t>& rows, int64_t dim, DType dtype,
                                          const DeviceLimits& device) {
  LaunchPlan plan;
  int64_t total_rows = 0, max_rows = 0;
  for (const int64_t n : rows) {
    plan.tiles += upper_tiles(n);
    total_rows += n;
    max_rows = std::max(max_rows, n);
  }
  plan.tile_slots = plan.tiles;
  plan.tiles_per_side = tiles_per_side(max_rows);
  plan_common(plan, total_rows, max_rows, dim, dtype, device);
  plan.items_per_launch = int64_t(rows.size());  // one launch holds them all
  return plan;
}

}  // namespace kernels
}  // namespace divprune
