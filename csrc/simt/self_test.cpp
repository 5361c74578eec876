// Deliberately broken kernels: each shows that the host SIMT runtime stops a
// kind of bug with a report (python_tests/test_kernels_on_cpu.py runs them via
// `kernel_runner --self-test NAME` and checks the report), and two show what
// poisoning and shuffled interleavings make visible.
#include <cstdio>
#include <cstring>
#include <string>

#include "simt/simt.h"

namespace {

__global__ void divergent_barriers(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void exit_before_barrier(int* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void lanes_disagree_on_mask(int* out) {
  const unsigned mask = threadIdx.x < 16 ? 0x0000FFFFu : 0xFFFFFFFFu;
  out[threadIdx.x] = __shfl_xor_sync(mask, int(threadIdx.x), 1);
}

__global__ void mask_leaves_out_caller(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFEu, int(threadIdx.x), 1);
}

__global__ void source_outside_mask(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0x0000FFFFu, int(threadIdx.x), 16);
}

__global__ void shuffle_against_barrier(int* out) {
  if (threadIdx.x == 0) {
    out[0] = __shfl_xor_sync(0xFFFFFFFFu, 1, 1);
  } else {
    __syncthreads();
  }
}

struct Slots {
  int value[32];
};

__global__ void shared_out_of_bounds(int* out) {
  Slots& slots = simt::shared_storage<Slots>();
  slots.value[threadIdx.x] = 1;  // 33 threads, 32 slots
  out[0] = 1;
}

__global__ void global_out_of_bounds(int* out) { out[threadIdx.x + 1] = 1; }

__global__ void misaligned_vector_load(const int* data, int* out) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(data + 1));
  out[threadIdx.x] = int(v.x);
}

__global__ void mma_in_partial_warp(float* out) {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc;
  nvcuda::wmma::fill_fragment(acc, 0.f);
  nvcuda::wmma::store_matrix_sync(out, acc, 16, nvcuda::wmma::mem_row_major);
}

// Reads a shared value no thread wrote: the runtime's poison (a NaN).
__global__ void read_unwritten_shared(float* out) {
  struct Values {
    float v[64];
  };
  Values& values = simt::shared_storage<Values>();
  if (threadIdx.x < 32) values.v[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = values.v[threadIdx.x];
}

// A missing barrier: thread t reads what thread t + 1 wrote, with no __syncthreads
// between. In order (seed 0) thread t + 1 has not run yet (but for t = 63);
// shuffled (other seeds), some have.
__global__ void missing_barrier(float* out) {
  struct Values {
    float v[64];
  };
  Values& values = simt::shared_storage<Values>();
  values.v[threadIdx.x] = float(threadIdx.x);
  __syncthreads();
  values.v[threadIdx.x] += 100.f;
  out[threadIdx.x] = values.v[(threadIdx.x + 1) % 64];  // should have waited for the other thread's add
}

template <typename T>
void print(const T* values, int n) {
  for (int i = 0; i < n; ++i) std::printf("%g%s", double(values[i]), i + 1 < n ? " " : "\n");
}

}  // namespace

// Runs the self-test `name`; returns false if there is none of that name.
bool run_self_test(const std::string& name, uint64_t seed) {
  simt::launch_seed = seed;
  int* ints = new int[64]();
  float* floats = new float[256]();
  alignas(16) static int data[8] = {};
  const dim3 one(1);
  if (name == "divergent_barriers") simt::launch(name.c_str(), divergent_barriers, one, dim3(32), ints);
  else if (name == "exit_before_barrier") simt::launch(name.c_str(), exit_before_barrier, one, dim3(32), ints);
  else if (name == "lanes_disagree_on_mask") simt::launch(name.c_str(), lanes_disagree_on_mask, one, dim3(32), ints);
  else if (name == "mask_leaves_out_caller") simt::launch(name.c_str(), mask_leaves_out_caller, one, dim3(32), ints);
  else if (name == "source_outside_mask") simt::launch(name.c_str(), source_outside_mask, one, dim3(32), ints);
  else if (name == "shuffle_against_barrier") simt::launch(name.c_str(), shuffle_against_barrier, one, dim3(32), ints);
  else if (name == "shared_out_of_bounds") simt::launch(name.c_str(), shared_out_of_bounds, one, dim3(33), ints);
  else if (name == "global_out_of_bounds") simt::launch(name.c_str(), global_out_of_bounds, one, dim3(64), ints);
  else if (name == "misaligned_vector_load") {
    simt::launch(name.c_str(), misaligned_vector_load, one, dim3(32), static_cast<const int*>(data), ints);
  } else if (name == "mma_in_partial_warp") simt::launch(name.c_str(), mma_in_partial_warp, one, dim3(48), floats);
  else if (name == "read_unwritten_shared") {
    simt::launch(name.c_str(), read_unwritten_shared, one, dim3(64), floats);
    print(floats, 64);
  } else if (name == "missing_barrier") {
    simt::launch(name.c_str(), missing_barrier, one, dim3(64), floats);
    print(floats, 64);
  } else {
    delete[] ints;
    delete[] floats;
    return false;
  }
  delete[] ints;
  delete[] floats;
  return true;
}
