// simt: a host runtime that runs this project's CUDA kernels on the CPU, for tests.
//
// The kernel headers in csrc/kernels/ include this file instead of the CUDA
// device headers when they are compiled by a host C++ compiler; nothing in the
// kernels is copied or rewritten. simt::launch runs a __global__ function over a
// grid: CTAs in waves of up to 16,384 threads, the threads of a wave as cooperative
// fibers that switch only at __syncthreads, warp-synchronous calls (shuffles,
// votes, WMMA), atomics and __threadfence.
//
// It finds bugs, not only runs code:
//   * barrier divergence (threads of a CTA at different __syncthreads, or some
//     exited while others wait), warp calls whose lanes disagree on the mask or the
//     operation, lanes reading a shuffle source outside the mask, partial warps in
//     WMMA, misaligned vector loads and WMMA pointers: each stops the run with a
//     report naming the kernel, the CTA and the thread;
//   * a nonzero seed shuffles the CTA order and the order in which fibers resume
//     after every barrier, warp call, atomic and fence, leaves threads behind at
//     barriers (runtime.cpp), and permutes the WMMA fragment layout (wmma.h), so a
//     missing barrier changes the result, also one that should order a CTA's writes
//     before the atomic that tells other CTAs it is done;
//   * shared memory (simt::shared_storage) is a fresh heap block per CTA, filled
//     with 0xFF bytes (NaN floats), so reading what nothing wrote shows up; built
//     with -fsanitize=address, an out-of-bounds access to it or to any buffer the
//     caller allocated with exact sizes stops the run.
// It cannot see what needs real concurrency or a memory model: a missing
// __threadfence (every write is visible at once), a plain read-modify-write where an
// atomic belongs (nothing runs between its read and its write), code that relies on
// warp lanes running in lockstep between warp calls (here every warp call also
// waits for all lanes in its mask, like __syncwarp), a kernel that waits for a CTA
// of a later wave.
//
// Numerics: __half / __nv_bfloat16 come from CUDA's own headers (same rounding as
// the device); WMMA multiplies exactly and accumulates in float32 in k order (real
// tensor cores accumulate in another order, with truncation: only rounding-level
// differences, which the tests allow for).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <tuple>
#include <type_traits>
#include <utility>

namespace simt {

// ----- The runtime (runtime.cpp) ---------------------------------------------

namespace detail {
extern uint3 thread_idx, block_idx;
extern dim3 block_dim, grid_dim;

// Stops the run: prints "simt: <kernel>, CTA (x, y, z), thread (x, y, z): <message>".
[[noreturn]] void fail(const char* format, ...) __attribute__((format(printf, 1, 2)));

// Runs `body` once per thread of every CTA of the grid.
void run_grid(const char* kernel, dim3 grid, dim3 block, uint64_t seed, void (*body)(void*), void* context);

// Lets other threads run first (atomics and fences: where other CTAs' threads can
// interleave with this one on a GPU).
void yield_to_other_threads();

// The calling thread waits at the CTA barrier at `site` until every thread of
// the CTA arrives there.
void sync_threads(const char* site);

// A warp-synchronous operation: the calling lane waits until every lane in `mask`
// has called an operation with the same `complete` function and mask; then
// `complete(args, mask)` runs once, with args[lane] = each lane's `args`.
using WarpComplete = void (*)(void* const* args, uint32_t mask);
void warp_sync_op(const char* name, uint32_t mask, WarpComplete complete, void* args);

// This CTA's block for the shared object `tag` (one per type), allocated and
// poisoned on first use, freed when the CTA ends.
void* shared_block(const void* tag, size_t size, size_t alignment);

unsigned lane_id();

// The element layout of WMMA fragments of kind `use` (0: matrix_a, 1: matrix_b,
// 2: accumulator) in this launch: 256 row-major indices (see wmma.h).
const uint16_t* fragment_layout(int use);
}  // namespace detail

// Default seed of simt::launch; the tests' kernel runner sets it per run.
extern uint64_t launch_seed;

// A CTA's shared memory: one T per type, as kernels::shared_storage on the GPU.
template <typename T>
T& shared_storage() {
  static_assert(std::is_trivially_default_constructible<T>::value, "__shared__ objects are not constructed");
  static const char tag = 0;
  return *static_cast<T*>(detail::shared_block(&tag, sizeof(T), alignof(T)));
}

// kernel<<<grid, block>>>(args...): the arguments are converted to the kernel's
// parameter types once, as a launch does, and every thread gets a copy.
template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) {
  struct Call {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
  } call{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  detail::run_grid(
      name, grid, block, launch_seed,
      [](void* context) {
        Call& c = *static_cast<Call*>(context);
        std::apply(c.kernel, c.params);
      },
      &call);
}

}  // namespace simt

// ----- CUDA built-ins on the host ---------------------------------------------

#define threadIdx (static_cast<const uint3&>(::simt::detail::thread_idx))
#define blockIdx (static_cast<const uint3&>(::simt::detail::block_idx))
#define blockDim (static_cast<const dim3&>(::simt::detail::block_dim))
#define gridDim (static_cast<const dim3&>(::simt::detail::grid_dim))

#define __launch_bounds__(...)

#define SIMT_STRINGIFY2(x) #x
#define SIMT_STRINGIFY(x) SIMT_STRINGIFY2(x)
#define __syncthreads() ::simt::detail::sync_threads(__FILE__ ":" SIMT_STRINGIFY(__LINE__))

using std::max;
using std::min;

inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

[[noreturn]] inline void __trap() { ::simt::detail::fail("__trap()"); }

// Every write is visible at once here; a fence is only a point where others may run.
inline void __threadfence() { ::simt::detail::yield_to_other_threads(); }

template <typename T>
T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) {
    ::simt::detail::fail("__ldg of a %zu-byte type from misaligned address %p", sizeof(T), static_cast<const void*>(p));
  }
  return *p;
}

template <typename T>
T __ldcg(const T* p) {
  return __ldg(p);
}

// Atomics: others may run first; the update itself runs without a switch, so it is atomic.
inline unsigned atomicMin(unsigned* address, unsigned value) {
  ::simt::detail::yield_to_other_threads();
  const unsigned old = *address;
  *address = std::min(old, value);
  return old;
}

inline int atomicAdd(int* address, int value) {
  ::simt::detail::yield_to_other_threads();
  const int old = *address;
  *address = old + value;
  return old;
}

// ----- Warp shuffles and votes ---------------------------------------------------

namespace simt {
namespace detail {

struct ShuffleArgs {
  uint64_t value;   // this lane's value, as bits
  int source;       // the lane whose value this lane reads
  uint64_t result;
};

void complete_shuffle(void* const* args, uint32_t mask);

template <typename T>
T shuffle(const char* name, uint32_t mask, T value, int source) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value, "shuffle of a 1-8 byte value");
  ShuffleArgs args{0, source, 0};
  std::memcpy(&args.value, &value, sizeof(T));
  warp_sync_op(name, mask, complete_shuffle, &args);
  T out;
  std::memcpy(&out, &args.result, sizeof(T));
  return out;
}

// The lane `lane ^ lane_mask` within the lane's segment of `width` lanes; outside
// the segment a lane reads its own value (CUDA's rule).
inline int xor_source(int lane_mask, int width) {
  const int lane = int(lane_id());
  const int source = lane ^ lane_mask;
  return source / width == lane / width ? source : lane;
}

struct BallotArgs {
  int predicate;
  uint32_t result;
};

void complete_ballot(void* const* args, uint32_t mask);

}  // namespace detail
}  // namespace simt

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return ::simt::detail::shuffle("__shfl_xor_sync", mask, value, ::simt::detail::xor_source(lane_mask, width));
}

template <typename T>
T __shfl_sync(unsigned mask, T value, int source_lane, int width = 32) {
  const int segment = int(::simt::detail::lane_id()) / width * width;
  return ::simt::detail::shuffle("__shfl_sync", mask, value, segment + source_lane % width);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  ::simt::detail::BallotArgs args{predicate, 0};
  ::simt::detail::warp_sync_op("__ballot_sync", mask, ::simt::detail::complete_ballot, &args);
  return args.result;
}

#include "simt/wmma.h"
