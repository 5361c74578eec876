// Shared declarations for the divprune operators. The schema lives in
// divprune.cpp; each device implements the ops in its own file.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace divprune {

// An input of shape (M, D) is treated as a batch of one.
struct ProblemShape {
  int64_t batch;
  int64_t rows;  // M: candidate tokens per batch item
  int64_t dim;   // D: feature size
};

// Validates `x` for every divprune op (rank, dtype, emptiness) and returns its
// shape as (B, M, D). `op` names the caller in error messages.
ProblemShape check_input(const at::Tensor& x, const char* op);

// Validates 1 <= k <= M.
void check_k(const ProblemShape& shape, int64_t k);

// The segments of select_varlen: x (N, D) holds consecutive runs of lengths[i] rows.
struct Segments {
  std::vector<int64_t> rows;   // n_i
  std::vector<int64_t> picks;  // k_i
  int64_t total_picks = 0;     // sum k_i: the output's length
  int64_t max_rows = 0;        // max n_i
};

// Validates x (N, D), sum(lengths) == N, n_i >= 1, len(k) == len(lengths) and
// 1 <= k_i <= n_i; errors name the argument and its values.
Segments check_segments(const at::Tensor& x, at::IntArrayRef lengths, at::IntArrayRef k, const char* op);

// Output shapes: (k,) / (B, k) for select, (M, M) / (B, M, M) for distances.
std::vector<int64_t> select_output_shape(const at::Tensor& x, int64_t k);
std::vector<int64_t> distance_output_shape(const at::Tensor& x);

}  // namespace divprune
