// CPU kernels: the Gram product goes through ATen's BLAS, the greedy
// max-min selection is a hand-written loop over the similarity matrix.
#include "divprune.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace divprune {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
// Below this many candidates a greedy step is too short to pay for a thread fork.
constexpr int64_t kParallelStepMinRows = 16384;

// Cosine similarity with the same ATen ops, in the same order, as
// divprune_ext.reference.pairwise_distance, so the CPU op is bit-identical to it.
// Scaling the Gram product by the inverse norms, instead of normalising x first,
// saves a full pass over the input (the Gram product is the only O(M^2 D) work).
at::Tensor cosine_similarity(const at::Tensor& x) {
  const auto xf = x.to(at::kFloat);
  const auto inv_norm = at::linalg_vector_norm(xf, 2, {-1}, /*keepdim=*/true).clamp_min(1e-12).reciprocal();
  return at::matmul(xf, xf.transpose(-2, -1)).mul_(inv_norm).mul_(inv_norm.transpose(-2, -1));
}

// NaN never wins, so a corrupt input still yields distinct indices.
inline float score(float min_distance) { return std::isnan(min_distance) ? -kInf : min_distance; }

struct Best {
  float value = -kInf;
  int64_t index = -1;
  // Candidates arrive in increasing index order, so strict `>` keeps the lowest index on ties.
  void offer(float v, int64_t i) {
    if (index < 0 || v > value) {
      value = v;
      index = i;
    }
  }
  void merge(const Best& later) {
    if (later.index >= 0) offer(later.value, later.index);
  }
};

// Folds the newest pick's distances into the running minima of [begin, end)
// and returns the best unpicked candidate there.
Best update_range(const float* pick_row, float* min_distance, const uint8_t* picked, int64_t begin,
                  int64_t end) {
  Best best;
  for (int64_t i = begin; i < end; ++i) {
    const float d = 1.0f - pick_row[i];
    const float m = d < min_distance[i] ? d : min_distance[i];
    min_distance[i] = m;
    if (!picked[i]) best.offer(score(m), i);
  }
  return best;
}

// `nearest_other[i]` is row i's minimum distance to the other rows; the first
// pick is the row where it is largest.
void greedy_select(const float* sim, const float* nearest_other, int64_t rows, int64_t k, int64_t* out) {
  std::vector<float> min_distance(rows, kInf);
  std::vector<uint8_t> picked(rows, 0);
  const int64_t chunks =
      rows >= kParallelStepMinRows ? std::min<int64_t>(at::get_num_threads(), rows / 8192) : 1;
  const int64_t chunk_rows = (rows + chunks - 1) / chunks;
  std::vector<Best> chunk_best(chunks);

  Best first;
  for (int64_t i = 0; i < rows; ++i) first.offer(score(nearest_other[i]), i);
  int64_t pick = first.index;
  for (int64_t step = 0; step < k; ++step) {
    out[step] = pick;
    picked[pick] = 1;
    if (step + 1 == k) break;
    const float* pick_row = sim + pick * rows;
    if (chunks == 1) {
      pick = update_range(pick_row, min_distance.data(), picked.data(), 0, rows).index;
      continue;
    }
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        chunk_best[c] = update_range(pick_row, min_distance.data(), picked.data(), c * chunk_rows,
                                     std::min(rows, (c + 1) * chunk_rows));
      }
    });
    Best best;
    for (const auto& b : chunk_best) best.merge(b);
    pick = best.index;
  }
}

// What the greedy loop reads, exactly as select computes it for x (M, D) / (B, M, D).
struct GreedyInputs {
  at::Tensor sim;            // similarities, the diagonal at -inf
  at::Tensor nearest_other;  // each row's minimum distance to the other rows
};

GreedyInputs greedy_inputs(const at::Tensor& x) {
  auto sim = cosine_similarity(x).contiguous();
  // A row's own similarity must not count as its nearest neighbour; the greedy
  // steps never read the diagonal of an unpicked row. min_j (1 - s_ij) rounds
  // exactly like 1 - max_j s_ij, since x -> 1 - x is monotone.
  sim.diagonal(0, -2, -1).fill_(-kInf);
  auto nearest_other = at::rsub(sim.amax(-1), 1.0).contiguous();
  return {sim, nearest_other};
}

at::Tensor select_cpu(const at::Tensor& x, int64_t k) {
  const auto shape = check_input(x, "divprune.select");
  check_k(shape, k);
  auto out = at::empty(select_output_shape(x, k), x.options().dtype(at::kLong));
  if (shape.batch == 0) return out;
  const auto in = greedy_inputs(x);
  const float* sim_data = in.sim.data_ptr<float>();
  const float* nearest_data = in.nearest_other.data_ptr<float>();
  int64_t* out_data = out.data_ptr<int64_t>();
  const int64_t rows = shape.rows;
  at::parallel_for(0, shape.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      greedy_select(sim_data + b * rows * rows, nearest_data + b * rows, rows, k, out_data + b * k);
    }
  });
  return out;
}

// Similarities held at once by select_varlen (floats): 1 MiB, or one segment's if larger.
// A group's greedy loops read its matrices right after the Gram products wrote them, while
// they are still in cache; larger groups measured slower than a loop of select (64 x 576:
// 0.77x with 256 MiB groups), so only segments under ~500 rows share a group.
constexpr int64_t kVarlenGroupFloats = int64_t(1) << 18;

// Bit-identical to a loop of select over the segments: each segment's similarities
// come from the same ATen calls on the same (n_i, D) view, one segment after another
// in this thread (a BLAS may sum in another order inside a parallel region). Only the
// greedy loops, whose result does not depend on threads, run in parallel over the
// segments of a group.
at::Tensor select_varlen_cpu(const at::Tensor& x, at::IntArrayRef lengths, at::IntArrayRef k) {
  const auto seg = check_segments(x, lengths, k, "divprune.select_varlen");
  auto out = at::empty({seg.total_picks}, x.options().dtype(at::kLong));
  int64_t* out_data = out.data_ptr<int64_t>();
  const size_t count = seg.rows.size();
  std::vector<int64_t> row0(count + 1, 0), pick0(count + 1, 0);
  for (size_t i = 0; i < count; ++i) {
    row0[i + 1] = row0[i] + seg.rows[i];
    pick0[i + 1] = pick0[i] + seg.picks[i];
  }
  for (size_t begin = 0, end; begin < count; begin = end) {
    int64_t floats = seg.rows[begin] * seg.rows[begin];
    for (end = begin + 1; end < count && floats + seg.rows[end] * seg.rows[end] <= kVarlenGroupFloats; ++end) {
      floats += seg.rows[end] * seg.rows[end];
    }
    std::vector<GreedyInputs> group;
    for (size_t i = begin; i < end; ++i) group.push_back(greedy_inputs(x.narrow(0, row0[i], seg.rows[i])));
    at::parallel_for(0, int64_t(end - begin), 1, [&](int64_t gb, int64_t ge) {
      for (int64_t g = gb; g < ge; ++g) {
        const size_t i = begin + size_t(g);
        int64_t* picks = out_data + pick0[i];
        greedy_select(group[g].sim.data_ptr<float>(), group[g].nearest_other.data_ptr<float>(), seg.rows[i],
                      seg.picks[i], picks);
        for (int64_t p = 0; p < seg.picks[i]; ++p) picks[p] += row0[i];  // local picks -> rows of x
      }
    });
  }
  return out;
}

at::Tensor pairwise_distance_cpu(const at::Tensor& x) {
  check_input(x, "divprune.pairwise_distance");
  // -s + 1 rounds exactly like the reference's 1 - s, without a second M x M buffer.
  return cosine_similarity(x).neg_().add_(1.0);
}

}  // namespace

TORCH_LIBRARY_IMPL(divprune, CPU, m) {
  m.impl("select", &select_cpu);
  m.impl("pairwise_distance", &pairwise_distance_cpu);
  m.impl("select_varlen", &select_varlen_cpu);
}

}  // namespace divprune
