// CUDA kernels for DivPrune.
//
// select(x, k) runs three kernels on the current stream, with no host sync:
//   1. row_norms_kernel      inverse L2 norm of every row (float32 accumulation);
//                            also resets the per-row minima and split-K counters.
//   2. distance_tile_kernel  one CTA per upper-triangular 64x64 tile of the Gram
//                            matrix (tensor cores for fp16/bf16, FMA for fp32),
//                            optionally split over D; its epilogue writes the tile
//                            and its mirror as cosine distances and folds each
//                            row's minimum distance to the *other* rows.
//   3. greedy_select_kernel  one CTA per batch item; running minima live in
//                            registers, each step streams the newest pick's row
//                            and picks with a block-wide argmax (lowest index wins ties).
#include "divprune.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace divprune {
namespace {

constexpr int kTile = 64;                   // Gram tile edge, rows and columns
constexpr int kStagingStride = kTile + 4;   // floats; WMMA stores need a multiple of 4
constexpr int kMaxCandidates = 65536;       // greedy kernel: 1024 threads x 64 registers
constexpr uint32_t kOrderedPlusInf = 0xFF800000u;  // ordered_bits(+inf)

// Maps floats to unsigned ints with the same order, so atomicMin works on them.
__device__ __forceinline__ uint32_t ordered_bits(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float from_ordered_bits(uint32_t u) {
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u);
}

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

// ---------------------------------------------------------------------------
// 1. Row norms
// ---------------------------------------------------------------------------

// One warp per row. Zero rows get 1/eps like F.normalize, so their distance is 1
// to everything.
template <typename scalar_t>
__global__ void row_norms_kernel(const scalar_t* __restrict__ x, int64_t total_rows, int64_t dim,
                                 float* __restrict__ inv_norm, uint32_t* __restrict__ row_min_bits,
                                 int* __restrict__ split_counters, int64_t num_counters) {
  const int64_t thread = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t c = thread; c < num_counters; c += int64_t(gridDim.x) * blockDim.x) split_counters[c] = 0;

  const int64_t row = thread / 32;
  const int lane = threadIdx.x % 32;
  if (row >= total_rows) return;
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

// ---------------------------------------------------------------------------
// 2. Distance tiles
// ---------------------------------------------------------------------------

// Where a CTA works: rows [row0, row0+64) x columns [col0, col0+64) of item
// `batch`, over features [k_begin, k_end).
struct TileJob {
  int64_t batch;
  int64_t row0, col0;
  int64_t k_begin, k_end;
  int64_t rows, dim;
};

// FMA core for any input type (fp32 inputs, and GPUs without bf16 tensor cores).
// 256 threads; each owns a 4x4 block of the tile.
template <typename scalar_t>
struct FmaCore {
  static constexpr int kThreads = 256;
  static constexpr int kChunk = 16;  // features per shared-memory stage
  struct Smem {
    alignas(16) float a[kChunk][kTile + 4];  // feature-major: a thread reads 4 rows as one float4
    alignas(16) float b[kChunk][kTile + 4];
  };

  // Leaves the raw dot products of the tile in `staging` (kTile x kStagingStride).
  __device__ static void compute(const scalar_t* __restrict__ x, const TileJob& job, Smem& smem,
                                 float* staging) {
    const int tid = threadIdx.x;
    const int ty = tid / 16, tx = tid % 16;
    float acc[4][4] = {};
    const scalar_t* xb = x + job.batch * job.rows * job.dim;
    for (int64_t k0 = job.k_begin; k0 < job.k_end; k0 += kChunk) {
      __syncthreads();  // previous stage fully consumed
      for (int e = tid; e < kTile * kChunk; e += kThreads) {
        const int r = e / kChunk, c = e % kChunk;
        const int64_t feature = k0 + c;
        const int64_t ra = job.row0 + r, rb = job.col0 + r;
        const bool in_k = feature < job.k_end;
        smem.a[c][r] = (in_k && ra < job.rows) ? to_float(xb[ra * job.dim + feature]) : 0.f;
        smem.b[c][r] = (in_k && rb < job.rows) ? to_float(xb[rb * job.dim + feature]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int c = 0; c < kChunk; ++c) {
        const float4 av = *reinterpret_cast<const float4*>(&smem.a[c][ty * 4]);
        const float4 bv = *reinterpret_cast<const float4*>(&smem.b[c][tx * 4]);
        const float a[4] = {av.x, av.y, av.z, av.w};
        const float b[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
    __syncthreads();  // staging may alias the operand buffers
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) staging[(ty * 4 + i) * kStagingStride + tx * 4 + j] = acc[i][j];
  }
};

// Tensor-core core for fp16/bf16: 4 warps, each a 32x32 quarter of the tile as
// 2x2 WMMA 16x16x16 fragments with float32 accumulators. Products of two 16-bit
// values are exact in float32, so only the summation order differs from fp32.
template <typename scalar_t>
struct TensorCoreCore {
  static constexpr int kThreads = 128;
  static constexpr int kChunk = 32;                 // features per stage
  static constexpr int kStride = kChunk + 8;        // halves; WMMA needs a multiple of 8
  static constexpr int kVec = 8;                    // 16-bit values per 16-byte load
  static constexpr int kLoadsPerThread = kTile * kChunk / kVec / kThreads;  // per operand
  struct Smem {
    alignas(128) scalar_t a[2][kTile * kStride];
    alignas(128) scalar_t b[2][kTile * kStride];
  };

  struct Staged {
    uint4 a[kLoadsPerThread];
    uint4 b[kLoadsPerThread];
  };

  __device__ static uint4 load8(const scalar_t* __restrict__ xb, const TileJob& job, int64_t row,
                                int64_t feature, bool aligned) {
    if (row < job.rows && aligned && feature + kVec <= job.k_end) {
      return __ldg(reinterpret_cast<const uint4*>(xb + row * job.dim + feature));
    }
    union {
      uint4 v;
      scalar_t s[kVec];
    } out;
    out.v = make_uint4(0, 0, 0, 0);  // zero padding past M or D
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (row < job.rows && feature + e < job.k_end) out.s[e] = xb[row * job.dim + feature + e];
    }
    return out.v;
  }

  __device__ static void load_stage(const scalar_t* __restrict__ xb, const TileJob& job, int64_t k0,
                                    bool aligned, Staged& st) {
#pragma unroll
    for (int l = 0; l < kLoadsPerThread; ++l) {
      const int v = threadIdx.x + l * kThreads;
      const int r = v / (kChunk / kVec), c = (v % (kChunk / kVec)) * kVec;
      st.a[l] = load8(xb, job, job.row0 + r, k0 + c, aligned);
      st.b[l] = load8(xb, job, job.col0 + r, k0 + c, aligned);
    }
  }

  __device__ static void store_stage(const Staged& st, Smem& smem, int buf) {
#pragma unroll
    for (int l = 0; l < kLoadsPerThread; ++l) {
      const int v = threadIdx.x + l * kThreads;
      const int r = v / (kChunk / kVec), c = (v % (kChunk / kVec)) * kVec;
      *reinterpret_cast<uint4*>(&smem.a[buf][r * kStride + c]) = st.a[l];
      *reinterpret_cast<uint4*>(&smem.b[buf][r * kStride + c]) = st.b[l];
    }
  }

  __device__ static void compute(const scalar_t* __restrict__ x, const TileJob& job, Smem& smem,
                                 float* staging) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // host code only dispatches here on sm_80 and newer
#else
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int warp_row = (warp / 2) * 32, warp_col = (warp % 2) * 32;
    const scalar_t* xb = x + job.batch * job.rows * job.dim;
    const bool aligned = job.dim % kVec == 0 && reinterpret_cast<uintptr_t>(xb) % 16 == 0;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

    Staged st;
    load_stage(xb, job, job.k_begin, aligned, st);
    store_stage(st, smem, 0);
    __syncthreads();
    int buf = 0;
    for (int64_t k0 = job.k_begin; k0 < job.k_end; k0 += kChunk, buf ^= 1) {
      const bool has_next = k0 + kChunk < job.k_end;
      if (has_next) load_stage(xb, job, k0 + kChunk, aligned, st);  // in flight during the MMAs
#pragma unroll
      for (int kk = 0; kk < kChunk; kk += 16) {
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
      // The other buffer was last read before the previous barrier.
      if (has_next) store_stage(st, smem, buf ^ 1);
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&staging[(warp_row + i * 16) * kStagingStride + warp_col + j * 16],
                                acc[i][j], kStagingStride, wmma::mem_row_major);
#endif
  }
};

// Split-K: each split stores its partial tile; the last split to arrive sums all
// partials in split order (deterministic) into `staging`. Returns false in the
// CTAs that should stop.
template <int kThreads>
__device__ bool reduce_splits(float* staging, float* __restrict__ partials, int* __restrict__ counter,
                              int splits, int split) {
  __shared__ bool is_last;
  float* mine = partials + int64_t(split) * kTile * kTile;
  __syncthreads();
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    mine[e] = staging[(e / kTile) * kStagingStride + e % kTile];
  }
  __threadfence();
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
  const float* inv = inv_norm + job.batch * M;
  float* out = dist + job.batch * M * M;
  uint32_t* row_min = row_min_bits + job.batch * M;

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

  // Row pass: rows of this tile's row block, lanes along columns (coalesced).
  for (int r = warp; r < kTile; r += kWarps) {
    const int64_t i = job.row0 + r;
    if (i >= M) break;
    float m = INFINITY;
    for (int c = lane; c < kTile; c += 32) {
      const int64_t j = job.col0 + c;
      if (j >= M || (diagonal && c < r)) continue;
      const float v = staging[r * kStagingStride + c];
      out[i * M + j] = v;
      if (c != r || !diagonal) m = fminf(m, v);
    }
    m = warp_min(m);
    if (lane == 0) atomicMin(&row_min[i], ordered_bits(m));
  }
  // Column pass: the mirror, rows of the column block.
  for (int c = warp; c < kTile; c += kWarps) {
    const int64_t j = job.col0 + c;
    if (j >= M) break;
    float m = INFINITY;
    for (int r = lane; r < kTile; r += 32) {
      const int64_t i = job.row0 + r;
      if (i >= M || (diagonal && r >= c)) continue;
      const float v = staging[r * kStagingStride + c];
      out[j * M + i] = v;
      m = fminf(m, v);
    }
    m = warp_min(m);
    if (lane == 0) atomicMin(&row_min[j], ordered_bits(m));
  }
}

// Grid: x = column tile, y = row tile (lower-triangle CTAs exit at once),
// z = batch item * splits + split.
template <typename scalar_t, typename Core>
__global__ void __launch_bounds__(Core::kThreads)
    distance_tile_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t dim, int64_t batch0,
                         int splits, int64_t split_len, const float* __restrict__ inv_norm,
                         float* __restrict__ dist, uint32_t* __restrict__ row_min_bits,
                         float* __restrict__ partials, int* __restrict__ split_counters) {
  const int64_t tile_row = blockIdx.y, tile_col = blockIdx.x;
  if (tile_row > tile_col) return;
  const int split = blockIdx.z % splits;
  TileJob job;
  job.batch = batch0 + blockIdx.z / splits;
  job.row0 = tile_row * kTile;
  job.col0 = tile_col * kTile;
  job.k_begin = split * split_len;
  job.k_end = min(dim, job.k_begin + split_len);
  job.rows = rows;
  job.dim = dim;

  // The staging tile reuses the operand buffers once the products are done.
  constexpr size_t kSharedBytes =
      std::max(sizeof(typename Core::Smem), sizeof(float) * kTile * kStagingStride);
  __shared__ alignas(128) unsigned char shared_bytes[kSharedBytes];
  auto& operands = *reinterpret_cast<typename Core::Smem*>(shared_bytes);
  float* staging = reinterpret_cast<float*>(shared_bytes);

  Core::compute(x, job, operands, staging);
  if (splits > 1) {
    const int64_t tiles_per_side = gridDim.x;
    const int64_t tile_id = (job.batch * tiles_per_side + tile_row) * tiles_per_side + tile_col;
    if (!reduce_splits<Core::kThreads>(staging, partials + tile_id * splits * kTile * kTile,
                                       split_counters + tile_id, splits, split)) {
      return;
    }
  }
  write_distances<Core::kThreads>(staging, job, inv_norm, dist, row_min_bits);
}

// ---------------------------------------------------------------------------
// 3. Greedy selection
// ---------------------------------------------------------------------------

// Key order = (score, then lower index): the max key is the argmax with ties
// to the lowest index. NaN scores rank as -inf so a corrupt input still yields
// distinct indices; -0 and +0 must tie.
__device__ __forceinline__ uint64_t candidate_key(float score, int index) {
  if (isnan(score)) score = -INFINITY;
  if (score == 0.f) score = 0.f;
  return (uint64_t(ordered_bits(score)) << 32) | uint32_t(~uint32_t(index));
}

__device__ __forceinline__ int key_index(uint64_t key) { return int(~uint32_t(key)); }

__device__ __forceinline__ uint64_t max_key(uint64_t a, uint64_t b) { return a > b ? a : b; }

// Block-wide max of `key`, known to every thread. `parity` alternates per call
// so one barrier suffices: a slot is rewritten only after the next barrier.
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

// Thread t owns candidates t, t + blockDim, ... (coalesced row reads). Valid
// keys are never 0, so 0 marks "nothing to offer". Indices fit in int32
// (M <= kMaxCandidates), which keeps the per-item state in registers.
template <int kItems>
__global__ void __launch_bounds__(1024)
    greedy_select_kernel(const float* __restrict__ dist, const uint32_t* __restrict__ row_min_bits,
                         int rows, int k, int64_t* __restrict__ out) {
  __shared__ uint64_t slots[2][32];
  const int64_t batch = blockIdx.x;
  const float* item_dist = dist + batch * rows * rows;
  int64_t* item_out = out + batch * k;

  float min_distance[kItems];
  uint64_t picked = 0;  // bit n: candidate threadIdx.x + n * blockDim.x is taken

  uint64_t key = 0;
#pragma unroll
  for (int n = 0; n < kItems; ++n) {
    const int i = threadIdx.x + n * blockDim.x;
    min_distance[n] = INFINITY;
    if (i < rows) key = max_key(key, candidate_key(from_ordered_bits(row_min_bits[batch * rows + i]), i));
  }
  int pick = key_index(block_max(key, slots, 0));

  for (int step = 0;; ++step) {
    if (threadIdx.x == 0) item_out[step] = pick;
    if (step + 1 == k) break;
    const float* pick_row = item_dist + int64_t(pick) * rows;
    key = 0;
#pragma unroll
    for (int n = 0; n < kItems; ++n) {
      const int i = threadIdx.x + n * blockDim.x;
      if (i == pick) picked |= uint64_t(1) << n;
      if (i < rows) {
        const float d = pick_row[i];
        const float m = d < min_distance[n] ? d : min_distance[n];
        min_distance[n] = m;
        if (!(picked >> n & 1)) key = max_key(key, candidate_key(m, i));
      }
    }
    pick = key_index(block_max(key, slots, (step + 1) & 1));
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

struct DeviceInfo {
  int multiprocessors = 0;
  bool bf16_tensor_cores = false;  // WMMA with fp16/bf16 inputs: sm_80 and newer
};

// Queried once per device: attribute queries are cheap but not free, and are
// allowed during CUDA graph capture.
const DeviceInfo& device_info(int device) {
  static DeviceInfo cache[64];
  TORCH_CHECK(device >= 0 && device < 64, "divprune: unsupported device index ", device);
  DeviceInfo& info = cache[device];
  if (info.multiprocessors == 0) {
    int major = 0, sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    info.bf16_tensor_cores = major >= 8;
    info.multiprocessors = sms;
  }
  return info;
}

at::Tensor allocate(at::IntArrayRef shape, const at::TensorOptions& options, const char* what) {
  try {
    return at::empty(shape, options);
  } catch (const c10::OutOfMemoryError&) {
    int64_t bytes = c10::elementSize(options.dtype().toScalarType());
    for (const int64_t s : shape) bytes *= s;
    TORCH_CHECK_WITH(OutOfMemoryError, false, "divprune: the ", what, " of shape ", shape, " needs ",
                     bytes, " bytes (", double(bytes) / double(1ull << 30), " GiB) on ",
                     options.device(), ", more than is free; prune fewer tokens per call or split the batch");
  }
  return {};  // unreachable: TORCH_CHECK_WITH(false) throws
}

struct Distances {
  at::Tensor dist;          // (B, M, M) float32
  at::Tensor row_min_bits;  // (B, M) ordered float bits: min distance to the other rows
};

template <typename scalar_t, typename Core>
void launch_distance_tiles(const at::Tensor& x, const ProblemShape& shape, const at::Tensor& inv_norm,
                           Distances& out, cudaStream_t stream) {
  const int64_t tiles_per_side = (shape.rows + kTile - 1) / kTile;
  const int64_t tiles = shape.batch * tiles_per_side * (tiles_per_side + 1) / 2;
  // Too few tiles to fill the GPU: split the D reduction, each split >= 4 stages.
  const int64_t stages = (shape.dim + Core::kChunk - 1) / Core::kChunk;
  const int64_t wanted = (2 * device_info(x.get_device()).multiprocessors + tiles - 1) / tiles;
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>({wanted, stages / 4, 16}));
  const int64_t split_len = (stages + splits - 1) / splits * Core::kChunk;
  splits = (shape.dim + split_len - 1) / split_len;

  at::Tensor partials, counters;
  const auto float_options = x.options().dtype(at::kFloat);
  const int64_t tile_slots = shape.batch * tiles_per_side * tiles_per_side;
  if (splits > 1) {
    partials = allocate({tile_slots * splits, kTile * kTile}, float_options, "split-K workspace");
    counters = at::empty({tile_slots}, x.options().dtype(at::kInt));
  }

  const int64_t total_rows = shape.batch * shape.rows;
  const int norm_threads = 256;
  const int64_t norm_blocks = std::max<int64_t>((total_rows * 32 + norm_threads - 1) / norm_threads, 1);
  row_norms_kernel<scalar_t><<<norm_blocks, norm_threads, 0, stream>>>(
      reinterpret_cast<const scalar_t*>(x.data_ptr()), total_rows, shape.dim, inv_norm.data_ptr<float>(),
      reinterpret_cast<uint32_t*>(out.row_min_bits.data_ptr<int32_t>()),
      splits > 1 ? counters.data_ptr<int>() : nullptr, splits > 1 ? tile_slots : 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t max_z = 65535 / splits;
  for (int64_t batch0 = 0; batch0 < shape.batch; batch0 += max_z) {
    const int64_t items = std::min(max_z, shape.batch - batch0);
    const dim3 grid(tiles_per_side, tiles_per_side, items * splits);
    distance_tile_kernel<scalar_t, Core><<<grid, Core::kThreads, 0, stream>>>(
        reinterpret_cast<const scalar_t*>(x.data_ptr()), shape.rows, shape.dim, batch0, int(splits),
        split_len, inv_norm.data_ptr<float>(), out.dist.data_ptr<float>(),
        reinterpret_cast<uint32_t*>(out.row_min_bits.data_ptr<int32_t>()),
        splits > 1 ? partials.data_ptr<float>() : nullptr, splits > 1 ? counters.data_ptr<int>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

Distances compute_distances(const at::Tensor& x_in, const ProblemShape& shape, const char* op) {
  TORCH_CHECK_VALUE(shape.rows <= kMaxCandidates, op, ": the CUDA kernels take at most ", kMaxCandidates,
                    " tokens per item, got M = ", shape.rows);
  const auto x = x_in.contiguous();
  const auto float_options = x.options().dtype(at::kFloat);
  Distances out;
  out.dist = allocate({shape.batch, shape.rows, shape.rows}, float_options, "float32 distance matrix");
  out.row_min_bits = at::empty({shape.batch, shape.rows}, x.options().dtype(at::kInt));
  const auto inv_norm = at::empty({shape.batch, shape.rows}, float_options);
  if (shape.batch == 0) return out;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool tensor_cores = device_info(x.get_device()).bf16_tensor_cores;
  switch (x.scalar_type()) {
    case at::kFloat:
      launch_distance_tiles<float, FmaCore<float>>(x, shape, inv_norm, out, stream);
      break;
    case at::kHalf:
      if (tensor_cores) launch_distance_tiles<__half, TensorCoreCore<__half>>(x, shape, inv_norm, out, stream);
      else launch_distance_tiles<__half, FmaCore<__half>>(x, shape, inv_norm, out, stream);
      break;
    case at::kBFloat16:
      if (tensor_cores) {
        launch_distance_tiles<__nv_bfloat16, TensorCoreCore<__nv_bfloat16>>(x, shape, inv_norm, out, stream);
      } else {
        launch_distance_tiles<__nv_bfloat16, FmaCore<__nv_bfloat16>>(x, shape, inv_norm, out, stream);
      }
      break;
    default:
      TORCH_CHECK_TYPE(false, op, ": unsupported dtype ", x.scalar_type());  // check_input rejects it first
  }
  return out;
}

template <int kItems>
void launch_greedy(const Distances& d, const ProblemShape& shape, int64_t k, at::Tensor& out,
                   cudaStream_t stream) {
  const int threads = kItems == 1 ? int((shape.rows + 31) / 32 * 32) : 1024;
  greedy_select_kernel<kItems><<<shape.batch, threads, 0, stream>>>(
      d.dist.data_ptr<float>(), reinterpret_cast<const uint32_t*>(d.row_min_bits.data_ptr<int32_t>()),
      int(shape.rows), int(k), out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor select_cuda(const at::Tensor& x, int64_t k) {
  const auto shape = check_input(x, "divprune.select");
  check_k(shape, k);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty(select_output_shape(x, k), x.options().dtype(at::kLong));
  if (shape.batch == 0) return out;
  const Distances d = compute_distances(x, shape, "divprune.select");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t per_thread = (shape.rows + 1023) / 1024;
  if (per_thread <= 1) launch_greedy<1>(d, shape, k, out, stream);
  else if (per_thread <= 2) launch_greedy<2>(d, shape, k, out, stream);
  else if (per_thread <= 4) launch_greedy<4>(d, shape, k, out, stream);
  else if (per_thread <= 8) launch_greedy<8>(d, shape, k, out, stream);
  else if (per_thread <= 16) launch_greedy<16>(d, shape, k, out, stream);
  else if (per_thread <= 32) launch_greedy<32>(d, shape, k, out, stream);
  else launch_greedy<64>(d, shape, k, out, stream);
  return out;
}

at::Tensor pairwise_distance_cuda(const at::Tensor& x) {
  const auto shape = check_input(x, "divprune.pairwise_distance");
  const c10::cuda::CUDAGuard guard(x.device());
  return compute_distances(x, shape, "divprune.pairwise_distance").dist.view(distance_output_shape(x));
}

}  // namespace

TORCH_LIBRARY_IMPL(divprune, CUDA, m) {
  m.impl("select", &select_cuda);
  m.impl("pairwise_distance", &pairwise_distance_cuda);
}

}  // namespace divprune
