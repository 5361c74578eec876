// Shared declarations for the divprune operators. The schema lives in
// divprune.cpp; each device implements the ops in its own file.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

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

// Output shapes: (k,) / (B, k) for select, (M, M) / (B, M, M) for distances.
std::vector<int64_t> select_output_shape(const at::Tensor& x, int64_t k);
std::vector<int64_t> distance_output_shape(const at::Tensor& x);

}  // namespace divprune
