// Operator schema and argument checks shared by the CPU and CUDA kernels.
#include "divprune.h"

#include <Python.h>
#include <torch/library.h>

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
}

}  // namespace divprune
