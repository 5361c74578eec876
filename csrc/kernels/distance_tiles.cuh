// Kernel 2: cosine distances, one CTA per upper-triangular 64x64 tile of the
// Gram matrix of one batch item (select) or of one segment (select_varlen: only
// the diagonal blocks of the packed rows, never a tile across two segments).
//
//   core      the dot products of the tile: FmaCore (256 threads, 4x4 outputs each)
//             or TensorCoreCore (4 warps, a 32x32 quarter each as 2x2 WMMA fragments);
//   split-D   with few tiles, one CTA per chunk of kChunkFeatures features; the last
//             CTA of a tile to arrive sums the partial tiles in chunk order;
//   epilogue  distances 1 - s * inv_i * inv_j, written to the tile and its mirror,
//             and each row's minimum over the other rows folded with atomicMin.
//
// Every CTA sums its chunks the same way (each chunk from zero, then added to the
// total in chunk order), so split and unsplit runs give the same bits.
#pragma once

#include "kernels/common.cuh"

namespace divprune {
namespace kernels {

constexpr int kStagingStride = kTile + 4;  // floats; WMMA stores need a multiple of 4

// Where a CTA works: rows [row0, row0+64) x columns [col0, col0+64) of one item's
// `rows` x `rows` matrix, over features [k_begin, k_end) (whole chunks, the last one
// cut at D). The item's rows start at row `row_base` of x, inv_norm and the row
// minima; its matrix at float `dist_base` of the distances; `tile_id` is its slot in
// the split-D counters and workspace.
struct TileJob {
  int64_t row_base, dist_base, tile_id;
  int64_t row0, col0;
  int64_t k_begin, k_end;
  int64_t rows, dim;
};

// True after the stage [k0, k0 + stage) that ends a chunk.
__device__ __forceinline__ bool ends_chunk(const TileJob& job, int64_t k0, int stage) {
  return (k0 + stage) % kChunkFeatures == 0 || k0 + stage >= job.k_end;
}

// FMA core for any input type (fp32 inputs, and GPUs without bf16 tensor cores).
// 256 threads; thread (ty, tx) owns rows ty*4..ty*4+3 and columns tx*4..tx*4+3.
template <typename scalar_t>
struct FmaCore {
  static constexpr int kThreads = 256;
  static constexpr int kStage = 16;  // features per shared-memory stage
  static_assert(kChunkFeatures % kStage == 0, "a stage never straddles two chunks");
  struct Operands {
    alignas(16) float a[kStage][kTile + 4];  // feature-major: a thread reads 4 rows as one float4
    alignas(16) float b[kStage][kTile + 4];
  };

  // Leaves the tile's dot products of features [k_begin, k_end) in `staging`
  // (kTile x kStagingStride), which may alias `smem`.
  __device__ static void compute(const scalar_t* __restrict__ xb, const TileJob& job, Operands& smem,
                                 float* staging) {
    const int tid = threadIdx.x;
    const int ty = tid / 16, tx = tid % 16;
    float total[4][4] = {};
    float acc[4][4];
    for (int64_t k0 = job.k_begin; k0 < job.k_end; k0 += kStage) {
      if (k0 % kChunkFeatures == 0) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
      }
      __syncthreads();  // previous stage fully consumed
      for (int e = tid; e < kTile * kStage; e += kThreads) {
        const int r = e / kStage, c = e % kStage;
        const int64_t feature = k0 + c;
        const int64_t ra = job.row0 + r, rb = job.col0 + r;
        const bool in_k = feature < job.k_end;
        smem.a[c][r] = (in_k && ra < job.rows) ? to_float(xb[ra * job.dim + feature]) : 0.f;
        smem.b[c][r] = (in_k && rb < job.rows) ? to_float(xb[rb * job.dim + feature]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int c = 0; c < kStage; ++c) {
        const float4 av = *reinterpret_cast<const float4*>(&smem.a[c][ty * 4]);
        const float4 bv = *reinterpret_cast<const float4*>(&smem.b[c][tx * 4]);
        const float a[4] = {av.x, av.y, av.z, av.w};
        const float b[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      if (ends_chunk(job, k0, kStage)) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) total[i][j] += acc[i][j];
      }
    }
    __syncthreads();  // staging aliases the operand buffers
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) staging[(ty * 4 + i) * kStagingStride + tx * 4 + j] = total[i][j];
  }
};

// Tensor-core core for fp16/bf16: 4 warps, warp w a 32x32 quarter of the tile
// (rows (w/2)*32.., columns (w%2)*32..) as 2x2 WMMA 16x16x16 fragments with float32
// accumulators. Products of two 16-bit values are exact in float32; the sums differ
// from fp32 FMAs in order and rounding (tensor cores may truncate), at rounding level. Stages of 32 features are double-buffered:
// the next stage's global loads are in flight in registers during this stage's MMAs.
template <typename scalar_t>
struct TensorCoreCore {
  static constexpr int kThreads = 128;
  static constexpr int kStage = 32;                 // features per stage
  static constexpr int kStride = kStage + 8;        // halves; WMMA needs a multiple of 8
  static constexpr int kVec = 8;                    // 16-bit values per 16-byte load
  static constexpr int kLoadsPerThread = kTile * kStage / kVec / kThreads;  // per operand
  static_assert(kChunkFeatures % kStage == 0, "a stage never straddles two chunks");
  struct Operands {
    alignas(32) scalar_t a[2][kTile * kStride];  // [buffer][row * kStride + feature]
    alignas(32) scalar_t b[2][kTile * kStride];
  };

  struct Staged {
    uint4 a[kLoadsPerThread];
    uint4 b[kLoadsPerThread];
  };

  // 8 features of one row; zeros past M or the end of the CTA's features. One
  // 16-byte load where the row start and D allow it, else element by element.
  __device__ static uint4 load8(const scalar_t* __restrict__ xb, const TileJob& job, int64_t row,
                                int64_t feature, bool aligned) {
    if (row < job.rows && aligned && feature + kVec <= job.k_end) {
      return __ldg(reinterpret_cast<const uint4*>(xb + row * job.dim + feature));
    }
    union {
      uint4 v;
      scalar_t s[kVec];
    } out;
    out.v = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (row < job.rows && feature + e < job.k_end) out.s[e] = xb[row * job.dim + feature + e];
    }
    return out.v;
  }

  // Thread t loads vectors t, t + 128, ... of each operand's 64 x 32 stage.
  __device__ static void load_stage(const scalar_t* __restrict__ xb, const TileJob& job, int64_t k0,
                                    bool aligned, Staged& st) {
#pragma unroll
    for (int l = 0; l < kLoadsPerThread; ++l) {
      const int v = threadIdx.x + l * kThreads;
      const int r = v / (kStage / kVec), c = (v % (kStage / kVec)) * kVec;
      st.a[l] = load8(xb, job, job.row0 + r, k0 + c, aligned);
      st.b[l] = load8(xb, job, job.col0 + r, k0 + c, aligned);
    }
  }

  __device__ static void store_stage(const Staged& st, Operands& smem, int buf) {
#pragma unroll
    for (int l = 0; l < kLoadsPerThread; ++l) {
      const int v = threadIdx.x + l * kThreads;
      const int r = v / (kStage / kVec), c = (v % (kStage / kVec)) * kVec;
      *reinterpret_cast<uint4*>(&smem.a[buf][r * kStride + c]) = st.a[l];
      *reinterpret_cast<uint4*>(&smem.b[buf][r * kStride + c]) = st.b[l];
    }
  }

  __device__ static void compute(const scalar_t* __restrict__ xb, const TileJob& job, Operands& smem,
                                 float* staging) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // the launcher picks this core only when the loaded code is sm_80+ (LaunchPlan)
#else
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int warp_row = (warp / 2) * 32, warp_col = (warp % 2) * 32;
    const bool aligned = job.dim % kVec == 0 && reinterpret_cast<uintptr_t>(xb) % 16 == 0;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> total[2][2], acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(total[i][j], 0.f);

    Staged st;
    load_stage(xb, job, job.k_begin, aligned, st);
    store_stage(st, smem, 0);
    __syncthreads();
    int buf = 0;
    for (int64_t k0 = job.k_begin; k0 < job.k_end; k0 += kStage, buf ^= 1) {
      if (k0 % kChunkFeatures == 0) {
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
      }
      const bool has_next = k0 + kStage < job.k_end;
      if (has_next) load_stage(xb, job, k0 + kStage, aligned, st);  // in flight during the MMAs
#pragma unroll
      for (int kk = 0; kk < kStage; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, scalar_t, wmma::row_major> a[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, scalar_t, wmma::col_major> b[2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
          wmma::load_matrix_sync(a[i], &smem.a[buf][(warp_row + i * 16) * kStride + kk], kStride);
#pragma unroll
        for (int j = 0; j < 2; ++j)
          wmma::load_matrix_sync(b[j], &smem.b[buf][(warp_col + j * 16) * kStride + kk], kStride);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
      if (ends_chunk(job, k0, kStage)) {
        // Same element order in both fragments, whatever the hardware layout.
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < total[i][j].num_elements; ++e) total[i][j].x[e] += acc[i][j].x[e];
      }
      // The other buffer was last read before the previous barrier.
      if (has_next) store_stage(st, smem, buf ^ 1);
      __syncthreads();
    }
    // The loop's last barrier: every warp is done with the operands that staging aliases.
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&staging[(warp_row + i * 16) * kStagingStride + warp_col + j * 16],
                                total[i][j], kStagingStride, wmma::mem_row_major);
#endif
  }
};

// A tile CTA's shared memory: the core's operand buffers, reused as the staging
// tile once the products are done, and the split-D arrival flag.
template <typename Core>
struct TileShared {
  union {
    typename Core::Operands operands;
    float staging[kTile * kStagingStride];
  };
  int is_last_split;
};

// Split-D: each split stores its partial tile; the last split to arrive sums all
// partials in split (= chunk) order into `staging`. Returns false in the CTAs
// that should stop.
template <int kThreads>
__device__ bool reduce_splits(float* staging, int& is_last, float* __restrict__ partials,
                              int* __restrict__ counter, int splits, int split) {
  float* mine = partials + int64_t(split) * kTile * kTile;
  __syncthreads();  // the core's staging writes are visible
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    mine[e] = staging[(e / kTile) * kStagingStride + e % kTile];
  }
  __threadfence();  // this split's partial is visible to the last one before it counts
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(counter, 1) == splits - 1;
  __syncthreads();
  if (!is_last) return false;
  __threadfence();
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    float sum = 0.f;
    for (int s = 0; s < splits; ++s) sum += __ldcg(partials + int64_t(s) * kTile * kTile + e);
    staging[(e / kTile) * kStagingStride + e % kTile] = sum;
  }
  return true;
}

// Converts the tile's dot products to distances, writes the tile (row pass) and
// its mirror (column pass), and folds per-row minima over j != i. In diagonal
// tiles only the upper triangle is computed once and mirrored, so the matrix is
// exactly symmetric.
template <int kThreads>
__device__ void write_distances(float* staging, const TileJob& job, const float* __restrict__ inv_norm,
                                float* __restrict__ dist, uint32_t* __restrict__ row_min_bits) {
  constexpr int kWarps = kThreads / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool diagonal = job.row0 == job.col0;
  const int64_t M = job.rows;
  const float* inv = inv_norm + job.row_base;
  float* out = dist + job.dist_base;
  uint32_t* row_min = row_min_bits + job.row_base;

  __syncthreads();
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    const int r = e / kTile, c = e % kTile;
    const int64_t i = job.row0 + r, j = job.col0 + c;
    if (i < M && j < M) {
      float& s = staging[r * kStagingStride + c];
      s = 1.0f - s * inv[i] * inv[j];
    }
  }
  __syncthreads();

  // Row pass: warp w takes rows w, w + kWarps, ...; lanes along columns (coalesced).
  for (int r = warp; r < kTile; r += kWarps) {
    const int64_t i = job.row0 + r;
    if (i >= M) break;
    uint32_t m = kOrderedPlusInf;
    for (int c = lane; c < kTile; c += 32) {
      const int64_t j = job.col0 + c;
      if (j >= M || (diagonal && c < r)) continue;
      const float v = staging[r * kStagingStride + c];
      out[i * M + j] = v;
      if (c != r || !diagonal) m = min(m, min_key(v));
    }
    m = warp_min(m);
    if (lane == 0) atomicMin(&row_min[i], m);
  }
  // Column pass: the mirror; warp w takes columns w, w + kWarps, ..., lanes along rows.
  for (int c = warp; c < kTile; c += kWarps) {
    const int64_t j = job.col0 + c;
    if (j >= M) break;
    uint32_t m = kOrderedPlusInf;
    for (int r = lane; r < kTile; r += 32) {
      const int64_t i = job.row0 + r;
      if (i >= M || (diagonal && r >= c)) continue;
      const float v = staging[r * kStagingStride + c];
      out[j * M + i] = v;
      m = min(m, min_key(v));
    }
    m = warp_min(m);
    if (lane == 0) atomicMin(&row_min[j], m);
  }
}

// One CTA's tile: the products (one chunk of features with split-D, else all), the
// split-D reduction, then the distances and row minima.
template <typename scalar_t, typename Core>
__device__ void compute_tile(const scalar_t* __restrict__ x, const TileJob& job, int splits, int split,
                             const float* __restrict__ inv_norm, float* __restrict__ dist,
                             uint32_t* __restrict__ row_min_bits, float* __restrict__ partials,
                             int* __restrict__ split_counters) {
  TileShared<Core>& smem = shared_storage<TileShared<Core>>();
  Core::compute(x + job.row_base * job.dim, job, smem.operands, smem.staging);
  if (splits > 1) {
    if (!reduce_splits<Core::kThreads>(smem.staging, smem.is_last_split,
                                       partials + job.tile_id * splits * kTile * kTile, split_counters + job.tile_id,
                                       splits, split)) {
      return;
    }
  }
  write_distances<Core::kThreads>(smem.staging, job, inv_norm, dist, row_min_bits);
}

// The features [k_begin, k_end) of a CTA: every chunk, or (split-D) chunk `split`.
__device__ __forceinline__ void set_features(TileJob& job, int64_t dim, int splits, int split) {
  job.k_begin = splits == 1 ? 0 : split * kChunkFeatures;
  job.k_end = splits == 1 ? dim : min(dim, job.k_begin + kChunkFeatures);
  job.dim = dim;
}

// select: a (B, M, D) batch. Grid: x = column tile, y = row tile (lower-triangle
// CTAs exit at once), z = batch item * splits + split.
template <typename scalar_t, typename Core>
__global__ void __launch_bounds__(Core::kThreads)
    distance_tile_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t dim, int64_t batch0,
                         int splits, const float* __restrict__ inv_norm, float* __restrict__ dist,
                         uint32_t* __restrict__ row_min_bits, float* __restrict__ partials,
                         int* __restrict__ split_counters) {
  const int64_t tile_row = blockIdx.y, tile_col = blockIdx.x;
  if (tile_row > tile_col) return;
  const int split = blockIdx.z % splits;
  const int64_t item = batch0 + blockIdx.z / splits;
  const int64_t tiles_per_side = gridDim.x;
  TileJob job;
  job.row_base = item * rows;
  job.dist_base = item * rows * rows;
  job.tile_id = (item * tiles_per_side + tile_row) * tiles_per_side + tile_col;
  job.row0 = tile_row * kTile;
  job.col0 = tile_col * kTile;
  job.rows = rows;
  set_features(job, dim, splits, split);
  compute_tile<scalar_t, Core>(x, job, splits, split, inv_norm, dist, row_min_bits, partials, split_counters);
}

// The segment that owns tile `tile` of the varlen launch: the last s with
// tile_start[s] <= tile (every segment owns at least one tile). A binary search in
// the table: log2(B) cached reads, the same for every thread of the CTA.
__device__ __forceinline__ int64_t segment_of_tile(const SegmentTable& table, int64_t tile) {
  int64_t lo = 0, hi = table.segments - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (table.tile_start[mid] <= tile) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// select_varlen: packed segments. Grid: x = one tile of the list of every segment's
// upper-triangular tiles (segment after segment, row-major within a segment), z =
// split. A CTA works inside one segment's diagonal block: its rows, its n x n matrix
// in the packed workspace, edge tiles cut at n, so no distance spans two segments.
template <typename scalar_t, typename Core>
__global__ void __launch_bounds__(Core::kThreads)
    varlen_distance_tile_kernel(const scalar_t* __restrict__ x, int64_t dim, SegmentTable table, int splits,
                                const float* __restrict__ inv_norm, float* __restrict__ dist,
                                uint32_t* __restrict__ row_min_bits, float* __restrict__ partials,
                                int* __restrict__ split_counters) {
  const int64_t tile = blockIdx.x;
  const int64_t segment = segment_of_tile(table, tile);
  TileJob job;
  job.row_base = table.row_start[segment];
  job.rows = table.row_start[segment + 1] - table.row_start[segment];
  job.dist_base = table.dist_start[segment];
  job.tile_id = tile;  // split-D slots: one per tile of the launch
  // Tile row r of a segment's upper triangle holds tiles (r, r), ..., (r, side - 1);
  // at most side = n / 64 <= 1024 steps, against the tile's 64 x 64 x D products.
  const int64_t side = (job.rows + kTile - 1) / kTile;
  int64_t tile_row = 0, rest = tile - table.tile_start[segment];
  while (rest >= side - tile_row) {
    rest -= side - tile_row;
    ++tile_row;
  }
  job.row0 = tile_row * kTile;
  job.col0 = (tile_row + rest) * kTile;
  set_features(job, dim, splits, int(blockIdx.z));
  compute_tile<scalar_t, Core>(x, job, splits, int(blockIdx.z), inv_norm, dist, row_min_bits, partials,
                               split_counters);
}

}  // namespace kernels
}  // namespace divprune
