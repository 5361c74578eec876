// CUDA implementation of the divprune operators: ATen glue around the kernels in
// csrc/kernels/ (allocations, the device's limits, launches on the current stream).
//
// select(x, k) runs three kernels with no host sync (see kernels/pipeline.cuh):
//   1. row_norms_kernel      inverse L2 norm of every row;
//   2. distance_tile_kernel  the cosine-distance matrix in 64x64 tiles, and each
//                            row's minimum distance to the other rows;
//   3. greedy_select_kernel  the greedy max-min selection, one CTA per item.
// select_varlen(x, lengths, k) runs the same three stages over packed segments, each
// in one launch over all segments whatever their number, after a small launch that
// writes the segment table (one per ~125 segments: the table travels in kernel
// parameters, see kernels/segment_table.cuh). No host sync: the lengths are host
// values, so the plan and the table are made on the host.
#include "divprune.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <mutex>
#include <utility>

#include "kernels/pipeline.cuh"

namespace divprune {
namespace {

using kernels::DeviceLimits;
using kernels::LaunchPlan;

// A kernel launch on the current stream (the pipeline's `launch`).
struct CudaLaunch {
  cudaStream_t stream;

  template <typename... Params, typename... Args>
  void operator()(const char* /*name*/, void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) const {
    kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// The PTX version the fp16 tensor-core kernel was compiled for, as loaded on the
// current device: built for an older architecture only ("7.5+PTX"), the JIT-compiled
// code is the core's __trap() branch, so the plan must choose the FMA core.
int loaded_tensor_core_ptx_version() {
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(
      &attributes, kernels::distance_tile_kernel<__half, kernels::TensorCoreCore<__half>>));
  return attributes.ptxVersion;
}

// Queried once per device, thread-safely (attribute queries are allowed during
// CUDA graph capture, but not free).
const DeviceLimits& device_limits(int device) {
  constexpr int kMaxDevices = 64;
  static std::once_flag once[kMaxDevices];
  static DeviceLimits limits[kMaxDevices];
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "divprune: unsupported device index ", device);
  std::call_once(once[device], [device] {
    limits[device].multiprocessors = at::cuda::getDeviceProperties(device)->multiProcessorCount;
    limits[device].tensor_core_ptx_version = loaded_tensor_core_ptx_version();
  });
  return limits[device];
}

kernels::DType kernel_dtype(at::ScalarType dtype, const char* op) {
  switch (dtype) {
    case at::kFloat: return kernels::DType::Float32;
    case at::kHalf: return kernels::DType::Float16;
    case at::kBFloat16: return kernels::DType::BFloat16;
    default: break;
  }
  TORCH_CHECK_TYPE(false, op, ": unsupported dtype ", dtype);  // check_input rejects it first
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
  at::Tensor row_min_bits;  // (B, M) kernels::min_key of each row's minimum distance to the other rows
};

// The scratch tensors of the distance kernels (row norms, split-D partials and arrival
// counters) and the pointers the kernels take; `dist` and `row_min_bits` are the caller's.
struct DistanceWorkspace {
  at::Tensor inv_norm, partials, counters;
  kernels::DistanceBuffers buffers;
};

DistanceWorkspace distance_workspace(const at::Tensor& x, int64_t total_rows, const LaunchPlan& plan,
                                     const at::Tensor& dist, const at::Tensor& row_min_bits) {
  const auto float_options = x.options().dtype(at::kFloat);
  DistanceWorkspace w;
  w.inv_norm = at::empty({total_rows}, float_options);
  if (plan.splits > 1) {
    w.partials = allocate({kernels::split_workspace_floats(plan)}, float_options, "split-D workspace");
    w.counters = at::empty({plan.tile_slots}, x.options().dtype(at::kInt));
  }
  w.buffers = kernels::DistanceBuffers{
      x.data_ptr(),
      w.inv_norm.data_ptr<float>(),
      dist.data_ptr<float>(),
      reinterpret_cast<uint32_t*>(row_min_bits.data_ptr<int32_t>()),
      plan.splits > 1 ? w.partials.data_ptr<float>() : nullptr,
      plan.splits > 1 ? w.counters.data_ptr<int>() : nullptr};
  return w;
}

Distances compute_distances(const at::Tensor& x_in, const ProblemShape& shape, const LaunchPlan& plan,
                            const char* op) {
  const auto x = x_in.contiguous();
  Distances out;
  out.dist = allocate({shape.batch, shape.rows, shape.rows}, x.options().dtype(at::kFloat), "float32 distance matrix");
  out.row_min_bits = at::empty({shape.batch, shape.rows}, x.options().dtype(at::kInt));
  if (shape.batch == 0) return out;
  const DistanceWorkspace w = distance_workspace(x, shape.batch * shape.rows, plan, out.dist, out.row_min_bits);
  CudaLaunch launch{c10::cuda::getCurrentCUDAStream()};
  kernels::launch_distances(launch, plan, kernel_dtype(x.scalar_type(), op), shape.batch, shape.rows, shape.dim,
                            w.buffers);
  return out;
}

LaunchPlan plan_for(const at::Tensor& x, const ProblemShape& shape, const char* op) {
  return kernels::make_launch_plan(shape.batch, shape.rows, shape.dim, kernel_dtype(x.scalar_type(), op),
                                   device_limits(x.get_device()));
}

at::Tensor select_cuda(const at::Tensor& x, int64_t k) {
  constexpr const char* op = "divprune.select";
  const auto shape = check_input(x, op);
  check_k(shape, k);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty(select_output_shape(x, k), x.options().dtype(at::kLong));
  if (shape.batch == 0) return out;
  const LaunchPlan plan = plan_for(x, shape, op);
  // The greedy kernel holds every candidate of an item in one CTA's registers.
  TORCH_CHECK_VALUE(plan.greedy_width != 0, op, ": the CUDA kernel selects from at most ",
                    kernels::kMaxGreedyThreads * kernels::kMaxCandidatesPerThread, " tokens per item, got M = ",
                    shape.rows);
  const Distances d = compute_distances(x, shape, plan, op);
  CudaLaunch launch{c10::cuda::getCurrentCUDAStream()};
  kernels::launch_greedy(launch, plan, shape.batch, shape.rows, k, d.dist.data_ptr<float>(),
                         reinterpret_cast<const uint32_t*>(d.row_min_bits.data_ptr<int32_t>()),
                         out.data_ptr<int64_t>());
  return out;
}

at::Tensor select_varlen_cuda(const at::Tensor& x_in, at::IntArrayRef lengths, at::IntArrayRef k) {
  constexpr const char* op = "divprune.select_varlen";
  const Segments seg = check_segments(x_in, lengths, k, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const int64_t total_rows = x.size(0), dim = x.size(1);
  const kernels::LaunchPlan plan = kernels::make_varlen_launch_plan(seg.rows, dim, kernel_dtype(x.scalar_type(), op),
                                                                    device_limits(x.get_device()));
  TORCH_CHECK_VALUE(plan.greedy_width != 0, op, ": the CUDA kernel selects from at most ",
                    kernels::kMaxGreedyThreads * kernels::kMaxCandidatesPerThread,
                    " tokens per segment, got a segment of ", seg.max_rows);
  TORCH_CHECK_VALUE(plan.tiles <= std::numeric_limits<int32_t>::max(), op, ": ", plan.tiles,
                    " distance tiles are more than one launch holds; split the batch");
  TORCH_CHECK_VALUE(int64_t(seg.rows.size()) <= std::numeric_limits<int32_t>::max(), op, ": too many segments (",
                    seg.rows.size(), ")");
  const std::vector<int64_t> values = kernels::segment_table_values(seg.rows, seg.picks);
  const int64_t segments = int64_t(seg.rows.size());
  const int64_t total_dist = values[3 * (segments + 1) - 1];

  auto out = at::empty({seg.total_picks}, x.options().dtype(at::kLong));
  const auto table = at::empty({int64_t(values.size())}, x.options().dtype(at::kLong));
  const auto dist = allocate({total_dist}, x.options().dtype(at::kFloat),
                             "float32 distance workspace (sum of lengths[i]^2)");
  const auto row_min_bits = at::empty({total_rows}, x.options().dtype(at::kInt));
  const DistanceWorkspace w = distance_workspace(x, total_rows, plan, dist, row_min_bits);
  CudaLaunch launch{c10::cuda::getCurrentCUDAStream()};
  kernels::launch_segment_table(launch, values, table.data_ptr<int64_t>());
  kernels::launch_varlen(launch, plan, kernel_dtype(x.scalar_type(), op), total_rows, dim,
                         kernels::segment_table_view(table.data_ptr<int64_t>(), segments), w.buffers,
                         out.data_ptr<int64_t>());
  return out;
}

at::Tensor pairwise_distance_cuda(const at::Tensor& x) {
  constexpr const char* op = "divprune.pairwise_distance";
  const auto shape = check_input(x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const LaunchPlan plan = plan_for(x, shape, op);
  return compute_distances(x, shape, plan, op).dist.view(distance_output_shape(x));
}

}  // namespace

TORCH_LIBRARY_IMPL(divprune, CUDA, m) {
  m.impl("select", &select_cuda);
  m.impl("pairwise_distance", &pairwise_distance_cuda);
  m.impl("select_varlen", &select_varlen_cuda);
}

}  // namespace divprune
