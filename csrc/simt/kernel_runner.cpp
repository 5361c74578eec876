// kernel_runner: runs the CUDA kernels of divprune (csrc/kernels/) on the host
// SIMT runtime, with the launch sequence and plan the CUDA operators use.
// python_tests/simt_kernels.py builds it (with AddressSanitizer and UBSan) and
// drives it; it has no torch dependency, so the sanitizers see only this code.
//
//   kernel_runner --dtype float16 --batch B --rows M --dim D --input FILE --out PREFIX
//                 [--k K] [--sms N] [--ptx-version V] [--max-threads T] [--max-grid-z Z]
//                 [--seed S] [--offset E] [--plan-only]
//   kernel_runner --dtype float16 --lengths n1,n2,... --ks k1,k2,... --dim D --input FILE --out PREFIX
//                 [device and run options as above]      (select_varlen's kernels)
//   kernel_runner --self-test NAME [--seed S]      (a deliberately broken kernel)
//
// Reads B*M*D values (raw bytes of the dtype) from FILE into a buffer of exactly
// E + B*M*D elements, at element offset E (E > 0: a misaligned input). Writes
// PREFIX.dist (float32 B*M*M), PREFIX.rowmin (uint32 B*M: the kernels' row-minimum
// keys) and, with --k, PREFIX.picks (int64 B*k). Every output and workspace starts
// filled with 0xFF bytes. With --lengths (varlen) the input is N = sum n_i rows,
// PREFIX.dist holds the packed diagonal blocks (sum n_i^2 floats), PREFIX.rowmin N
// keys and PREFIX.picks the sum k_i picks. Prints the plan and the launches as one
// JSON object; --plan-only prints them without running anything.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/pipeline.cuh"

namespace {

using namespace divprune::kernels;

[[noreturn]] void usage(const std::string& problem) {
  std::fprintf(stderr, "kernel_runner: %s\n", problem.c_str());
  std::exit(2);
}

struct Options {
  DType dtype = DType::Float32;
  int64_t batch = 1, rows = 0, dim = 0, k = 0, offset = 0;
  DeviceLimits device;
  uint64_t seed = 0;
  std::string input, out;
  bool plan_only = false;
  std::vector<int64_t> lengths, ks;  // varlen mode when lengths is not empty
};

std::vector<int64_t> parse_list(const std::string& value) {
  std::vector<int64_t> list;
  size_t begin = 0;
  while (begin <= value.size()) {
    const size_t end = std::min(value.find(',', begin), value.size());
    list.push_back(std::stoll(value.substr(begin, end - begin)));
    begin = end + 1;
  }
  return list;
}

Options parse(int argc, char** argv) {
  Options o;
  o.device.multiprocessors = 132;
  o.device.tensor_core_ptx_version = 90;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--plan-only") {
      o.plan_only = true;
      continue;
    }
    if (i + 1 >= argc) usage("missing value after " + flag);
    const std::string value = argv[++i];
    if (flag == "--dtype") {
      if (value == "float32") o.dtype = DType::Float32;
      else if (value == "float16") o.dtype = DType::Float16;
      else if (value == "bfloat16") o.dtype = DType::BFloat16;
      else usage("unknown dtype " + value);
    } else if (flag == "--batch") o.batch = std::stoll(value);
    else if (flag == "--rows") o.rows = std::stoll(value);
    else if (flag == "--dim") o.dim = std::stoll(value);
    else if (flag == "--k") o.k = std::stoll(value);
    else if (flag == "--lengths") o.lengths = parse_list(value);
    else if (flag == "--ks") o.ks = parse_list(value);
    else if (flag == "--offset") o.offset = std::stoll(value);
    else if (flag == "--sms") o.device.multiprocessors = std::stoi(value);
    else if (flag == "--ptx-version") o.device.tensor_core_ptx_version = std::stoi(value);
    else if (flag == "--max-threads") o.device.max_greedy_threads = std::stoi(value);
    else if (flag == "--max-grid-z") o.device.max_grid_z = std::stoll(value);
    else if (flag == "--seed") o.seed = std::stoull(value);
    else if (flag == "--input") o.input = value;
    else if (flag == "--out") o.out = value;
    else usage("unknown option " + flag);
  }
  if (!o.lengths.empty()) {
    if (o.ks.size() != o.lengths.size()) usage("--ks needs one entry per --lengths entry");
    o.rows = 0;
    for (size_t i = 0; i < o.lengths.size(); ++i) {
      if (o.lengths[i] < 1 || o.ks[i] < 1 || o.ks[i] > o.lengths[i]) usage("need 1 <= k_i <= n_i");
      o.rows += o.lengths[i];
    }
    o.batch = 1;  // the packed rows
  }
  if (o.batch < 1 || o.rows < 1 || o.dim < 1) usage("need --batch, --rows and --dim >= 1");
  if (o.k < 0 || o.k > o.rows) usage("--k must be in [1, rows]");
  const int threads = o.device.max_greedy_threads;
  if (threads < 32 || threads > kMaxGreedyThreads || threads % 32 != 0) usage("--max-threads: a multiple of 32 in [32, 1024]");
  if (o.device.max_grid_z < 1 || o.device.max_grid_z > kMaxGridZ) usage("--max-grid-z must be in [1, 65535]");
  return o;
}

size_t element_size(DType dtype) { return dtype == DType::Float32 ? 4 : 2; }

// An exactly sized heap buffer (AddressSanitizer catches any access past it),
// filled with 0xFF bytes until a kernel writes it.
template <typename T>
struct Buffer {
  T* data = nullptr;
  explicit Buffer(int64_t count) : data(static_cast<T*>(std::malloc(std::max<size_t>(size_t(count) * sizeof(T), 1)))) {
    if (!data) usage("out of memory");
    std::memset(data, 0xFF, size_t(count) * sizeof(T));
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { std::free(data); }
};

void write_file(const std::string& path, const void* data, size_t bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(data, 1, bytes, f) != bytes) usage("cannot write " + path);
  std::fclose(f);
}

// The pipeline's `launch`: records each launch, and runs it unless planning only.
struct HostLaunch {
  bool run;
  std::string log;

  template <typename... Params, typename... Args>
  void operator()(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) {
    char entry[200];
    std::snprintf(entry, sizeof entry, "%s{\"kernel\": \"%s\", \"grid\": [%u, %u, %u], \"block\": [%u, %u, %u]}",
                  log.empty() ? "" : ", ", name, grid.x, grid.y, grid.z, block.x, block.y, block.z);
    log += entry;
    if (run) simt::launch(name, kernel, grid, block, std::forward<Args>(args)...);
  }
};

void print_plan(const LaunchPlan& plan, const HostLaunch& launches) {
  std::printf(
      "{\"core\": \"%s\", \"chunks\": %lld, \"splits\": %d, \"items_per_launch\": %lld, \"greedy_threads\": %d, "
      "\"greedy_width\": %d, \"launches\": [%s]}\n",
      plan.core == TileCore::TensorCore ? "tensor" : "fma", static_cast<long long>(plan.chunks), plan.splits,
      static_cast<long long>(plan.items_per_launch), plan.greedy_threads, plan.greedy_width, launches.log.c_str());
}

// Reads the input rows (N * D values at element offset E of an exact buffer).
void read_input(const Options& o, Buffer<char>& input, int64_t values) {
  const size_t bytes = element_size(o.dtype);
  FILE* f = std::fopen(o.input.c_str(), "rb");
  if (!f || std::fread(input.data + o.offset * bytes, bytes, size_t(values), f) != size_t(values)) {
    usage("cannot read " + std::to_string(values) + " values from '" + o.input + "'");
  }
  std::fclose(f);
}

// select_varlen's launches, as divprune_cuda.cu makes them: the segment table written
// by its kernel into an exactly sized buffer, the packed sum n_i^2 distance workspace.
int run_varlen(const Options& o) {
  const LaunchPlan plan = make_varlen_launch_plan(o.lengths, o.dim, o.dtype, o.device);
  if (plan.greedy_width == 0) usage("M is beyond the greedy kernel's width");
  HostLaunch launch{!o.plan_only, {}};
  simt::launch_seed = o.seed;
  const std::vector<int64_t> values = segment_table_values(o.lengths, o.ks);
  const int64_t segments = int64_t(o.lengths.size());
  const int64_t total_dist = values[3 * (segments + 1) - 1], total_picks = values[2 * (segments + 1) - 1];

  const int64_t run = o.plan_only ? 0 : 1;
  const size_t bytes = element_size(o.dtype);
  Buffer<char> input(run * (o.offset + o.rows * o.dim) * int64_t(bytes));
  if (run) read_input(o, input, o.rows * o.dim);
  Buffer<int64_t> table_values(int64_t(values.size()));
  launch_segment_table(launch, values, table_values.data);
  Buffer<float> inv_norm(run * o.rows), dist(run * total_dist);
  Buffer<uint32_t> row_min(run * o.rows);
  Buffer<float> partials(run * split_workspace_floats(plan));
  Buffer<int> counters(run * plan.tile_slots);
  Buffer<int64_t> picks(run * total_picks);

  const bool split = plan.splits > 1;
  const DistanceBuffers buffers{input.data + (run ? o.offset * bytes : 0), inv_norm.data, dist.data, row_min.data,
                                split ? partials.data : nullptr, split ? counters.data : nullptr};
  launch_varlen(launch, plan, o.dtype, o.rows, o.dim, segment_table_view(table_values.data, segments), buffers,
                picks.data);
  print_plan(plan, launch);
  if (!run) return 0;
  write_file(o.out + ".dist", dist.data, size_t(total_dist) * sizeof(float));
  write_file(o.out + ".rowmin", row_min.data, size_t(o.rows) * sizeof(uint32_t));
  write_file(o.out + ".picks", picks.data, size_t(total_picks) * sizeof(int64_t));
  return 0;
}

}  // namespace

bool run_self_test(const std::string& name, uint64_t seed);  // self_test.cpp

int main(int argc, char** argv) {
  if (argc >= 3 && std::string(argv[1]) == "--self-test") {
    const uint64_t seed = argc >= 5 && std::string(argv[3]) == "--seed" ? std::stoull(argv[4]) : 0;
    if (!run_self_test(argv[2], seed)) usage(std::string("no self-test named ") + argv[2]);
    return 0;
  }
  const Options o = parse(argc, argv);
  if (!o.lengths.empty()) return run_varlen(o);
  const LaunchPlan plan = make_launch_plan(o.batch, o.rows, o.dim, o.dtype, o.device);
  if (o.k > 0 && plan.greedy_width == 0) usage("M is beyond the greedy kernel's width");
  HostLaunch launch{!o.plan_only, {}};
  simt::launch_seed = o.seed;

  // Planning only: no input, and buffers of one element (nothing runs).
  const int64_t run = o.plan_only ? 0 : 1;
  const int64_t values = o.batch * o.rows * o.dim;
  const size_t bytes = element_size(o.dtype);
  Buffer<char> input(run * (o.offset + values) * int64_t(bytes));
  if (run) read_input(o, input, values);
  Buffer<float> inv_norm(run * o.batch * o.rows), dist(run * o.batch * o.rows * o.rows);
  Buffer<uint32_t> row_min(run * o.batch * o.rows);
  Buffer<float> partials(run * split_workspace_floats(plan));
  Buffer<int> counters(run * plan.tile_slots);
  Buffer<int64_t> picks(run * o.batch * o.k);

  const bool split = plan.splits > 1;
  const DistanceBuffers buffers{input.data + (run ? o.offset * bytes : 0), inv_norm.data, dist.data, row_min.data,
                                split ? partials.data : nullptr, split ? counters.data : nullptr};
  launch_distances(launch, plan, o.dtype, o.batch, o.rows, o.dim, buffers);
  if (o.k > 0) launch_greedy(launch, plan, o.batch, o.rows, o.k, dist.data, row_min.data, picks.data);
  print_plan(plan, launch);
  if (!run) return 0;

  write_file(o.out + ".dist", dist.data, size_t(o.batch * o.rows * o.rows) * sizeof(float));
  write_file(o.out + ".rowmin", row_min.data, size_t(o.batch * o.rows) * sizeof(uint32_t));
  if (o.k > 0) write_file(o.out + ".picks", picks.data, size_t(o.batch * o.k) * sizeof(int64_t));
  return 0;
}
