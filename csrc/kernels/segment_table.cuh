// Kernel 0 of select_varlen: writes the segment table (launch_plan.h:
// segment_table_values) into device memory from kernel parameters.
//
// Why a kernel and not a memcpy: a CUDA graph copies a kernel's parameters when it
// is captured, so the table is part of the graph and replays need no host buffer;
// a captured host-to-device memcpy would instead re-read host memory that must
// outlive the graph, and a copy from pageable memory can't be captured at all.
// One launch carries kTableChunkValues values (the parameters stay under 4 KiB), and
// a segment takes 4: one launch per ~125 segments, so the usual batch needs one.
#pragma once

#include "kernels/common.cuh"

namespace divprune {
namespace kernels {

constexpr int kTableChunkValues = 500;

struct TableChunk {
  int64_t first;  // index in the table of values[0]
  int64_t count;  // values used, <= kTableChunkValues
  int64_t values[kTableChunkValues];
};

// Grid: one CTA of kTableThreads threads; thread t writes values t, t + 128, ...
constexpr int kTableThreads = 128;

__global__ void segment_table_kernel(const TableChunk chunk, int64_t* __restrict__ table) {
  for (int64_t i = threadIdx.x; i < chunk.count; i += blockDim.x) table[chunk.first + i] = chunk.values[i];
}

}  // namespace kernels
}  // namespace divprune
