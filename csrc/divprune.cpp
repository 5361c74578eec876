// Operator schema and argument checks shared by the CPU and CUDA kernels.
#include "divprune.h"

#include <Python.h>
#include <torch/library.h>

#include <algorithm>

// Importing divprune_ext._C loads this library, whose static initialisers
// register the operators; the module itself exports nothing.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace divprune {

ProblemShape check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, op,
                    ": x must have shape (M, D) or (B, M, D), got a ", x.dim(),
                    "-D tensor of shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
                   ": x must be float32, float16 or bfloat16, got ", dtype);
  ProblemShape shape{x.dim() == 3 ? x.size(0) : 1, x.size(-2), x.size(-1)};
  TORCH_CHECK_VALUE(shape.rows > 0 && shape.dim > 0, op,
                    ": x is empty (M = ", shape.rows, " tokens of D = ", shape.dim,
                    " features, shape ", x.sizes(), "); need M >= 1 and D >= 1");
  return shape;
}

void check_k(const ProblemShape& shape, int64_t k) {
  TORCH_CHECK_VALUE(k >= 1 && k <= shape.rows, "divprune.select: k must be in [1, M] = [1, ",
                    shape.rows, "], got k = ", k);
}

Segments check_segments(const at::Tensor& x, at::IntArrayRef lengths, at::IntArrayRef k, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must have shape (N, D) (the segments' rows, packed), got a ", x.dim(),
                    "-D tensor of shape ", x.sizes());
  check_input(x, op);
  TORCH_CHECK_VALUE(!lengths.empty(), op, ": lengths is empty; give one length per segment");
  TORCH_CHECK_VALUE(k.size() == lengths.size(), op, ": k must have one entry per segment: len(k) = ", k.size(),
                    ", len(lengths) = ", lengths.size());
  Segments s;
  int64_t total_rows = 0;
  for (size_t i = 0; i < lengths.size(); ++i) {
    TORCH_CHECK_VALUE(lengths[i] >= 1, op, ": lengths[", i, "] = ", lengths[i], "; every segment needs >= 1 row");
    TORCH_CHECK_VALUE(k[i] >= 1 && k[i] <= lengths[i], op, ": k[", i, "] must be in [1, lengths[", i, "]] = [1, ",
                      lengths[i], "], got k[", i, "] = ", k[i]);
    total_rows += lengths[i];
    s.total_picks += k[i];
    s.max_rows = std::max(s.max_rows, lengths[i]);
  }
  TORCH_CHECK_VALUE(total_rows == x.size(0), op, ": sum(lengths) = ", total_rows, " but x has N = ", x.size(0),
                    " rows");
  s.rows.assign(lengths.begin(), lengths.end());
  s.picks.assign(k.begin(), k.end());
  return s;
}

std::vector<int64_t> select_output_shape(const at::Tensor& x, int64_t k) {
  if (x.dim() == 3) return {x.size(0), k};
  return {k};
}

std::vector<int64_t> distance_output_shape(const at::Tensor& x) {
  if (x.dim() == 3) return {x.size(0), x.size(1), x.size(1)};
  return {x.size(0), x.size(0)};
}

TORCH_LIBRARY(divprune, m) {
  // Fake (meta) kernels are registered in Python; this tells torch where.
  m.set_python_module("divprune_ext._fake");
  m.def("select(Tensor x, int k) -> Tensor");
  m.def("pairwise_distance(Tensor x) -> Tensor");
  // Packed segments (like FlashAttention's varlen): x (N, D), sum(lengths) == N; the
  // result holds each segment's picks in turn, as rows of x, in selection order.
  m.def("select_varlen(Tensor x, SymInt[] lengths, SymInt[] k) -> Tensor");
}

}  // namespace divprune
