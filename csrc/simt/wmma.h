// nvcuda::wmma on the host SIMT runtime: 16x16x16 fragments, fp16 / bf16 inputs,
// float32 accumulators.
//
// A fragment holds its matrix spread over the warp, 8 elements per lane (matrix_a:
// M x K, matrix_b: K x N, accumulator: M x N). Which element of the matrix lane l's
// x[e] is, is unspecified on a GPU and differs between architectures: here it is
// the row-major element layout[8l + e], where `layout` is the identity for seed 0
// and a random permutation per fragment kind for other seeds, so a kernel that
// relies on one layout gives different results. Combining fragments of one kind
// elementwise (x[e], num_elements) means the same in every layout.
// load / store / mma are warp-synchronous: every lane of a full warp must call
// them with the same pointer and stride, and they run once for the warp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the host runtime has 16x16x16 fragments only");
  using element_type = T;
  using use = Use;
  static constexpr int rows = 16, cols = 16;
  static constexpr int num_elements = rows * cols / 32;
  T x[num_elements];
};

namespace detail {

template <typename Use>
const uint16_t* layout_of() {
  return ::simt::detail::fragment_layout(std::is_same<Use, matrix_a>::value   ? 0
                                         : std::is_same<Use, matrix_b>::value ? 1
                                                                              : 2);
}

// Arguments of one lane's load or store.
struct MemoryArgs {
  void* fragment;
  void* pointer;
  unsigned ldm;
  bool column_major;
};

template <typename Frag>
void check_memory_args(void* const* args, uint32_t, const char* op) {
  using T = typename Frag::element_type;
  const auto* first = static_cast<const MemoryArgs*>(args[0]);
  for (int lane = 1; lane < 32; ++lane) {
    const auto* a = static_cast<const MemoryArgs*>(args[lane]);
    if (a->pointer != first->pointer || a->ldm != first->ldm) {
      ::simt::detail::fail("%s: lane %d passes pointer %p, ldm %u; lane 0 pointer %p, ldm %u", op, lane, a->pointer,
                           a->ldm, first->pointer, first->ldm);
    }
  }
  if (reinterpret_cast<uintptr_t>(first->pointer) % 32 != 0) {
    ::simt::detail::fail("%s: pointer %p is not 256-bit aligned", op, first->pointer);
  }
  if (first->ldm * sizeof(T) % 16 != 0) {
    ::simt::detail::fail("%s: ldm %u is not a multiple of 16 bytes", op, first->ldm);
  }
}

// Element (r, c) of the fragment's matrix is at pointer[offset(r, c)].
inline size_t memory_offset(const MemoryArgs& a, int r, int c) {
  return a.column_major ? size_t(c) * a.ldm + r : size_t(r) * a.ldm + c;
}

template <typename Frag>
void complete_load(void* const* args, uint32_t mask) {
  check_memory_args<Frag>(args, mask, "wmma::load_matrix_sync");
  using T = typename Frag::element_type;
  const auto& first = *static_cast<const MemoryArgs*>(args[0]);
  const T* source = static_cast<const T*>(first.pointer);
  for (int lane = 0; lane < 32; ++lane) {
    auto& frag = *static_cast<Frag*>(static_cast<MemoryArgs*>(args[lane])->fragment);
    for (int e = 0; e < Frag::num_elements; ++e) {
      const int index = layout_of<typename Frag::use>()[lane * Frag::num_elements + e];
      frag.x[e] = source[memory_offset(first, index / Frag::cols, index % Frag::cols)];
    }
  }
}

template <typename Frag>
void complete_store(void* const* args, uint32_t mask) {
  check_memory_args<Frag>(args, mask, "wmma::store_matrix_sync");
  using T = typename Frag::element_type;
  const auto& first = *static_cast<const MemoryArgs*>(args[0]);
  T* target = static_cast<T*>(first.pointer);
  for (int lane = 0; lane < 32; ++lane) {
    const auto& frag = *static_cast<const Frag*>(static_cast<MemoryArgs*>(args[lane])->fragment);
    for (int e = 0; e < Frag::num_elements; ++e) {
      const int index = layout_of<typename Frag::use>()[lane * Frag::num_elements + e];
      target[memory_offset(first, index / Frag::cols, index % Frag::cols)] = frag.x[e];
    }
  }
}

inline float as_float(float v) { return v; }
inline float as_float(__half v) { return __half2float(v); }
inline float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// The whole matrix of the fragments that are member `member` of each lane's args.
template <typename Frag>
void gather(void* const* args, size_t member, float (&matrix)[16][16]) {
  for (int lane = 0; lane < 32; ++lane) {
    const auto& frag = *static_cast<const Frag*>(static_cast<void* const*>(args[lane])[member]);
    for (int e = 0; e < Frag::num_elements; ++e) {
      const int index = layout_of<typename Frag::use>()[lane * Frag::num_elements + e];
      matrix[index / Frag::cols][index % Frag::cols] = as_float(frag.x[e]);
    }
  }
}

// d += a * b for one 16x16x16 tile, each sum in k order. The runtime's own
// arithmetic, not kernel code: left out of the sanitizers, which slow it tenfold.
__attribute__((no_sanitize("address", "undefined"))) inline void multiply_accumulate(
    const float (&a)[16][16], const float (&b)[16][16], float (&d)[16][16]) {
  for (int m = 0; m < 16; ++m)
    for (int k = 0; k < 16; ++k)
      for (int n = 0; n < 16; ++n) d[m][n] += a[m][k] * b[k][n];
}

template <typename FragD, typename FragA, typename FragB, typename FragC>
void complete_mma(void* const* args, uint32_t) {
  // args[lane] -> {&d, &a, &b, &c} of that lane. Read everything before writing d (it may be c).
  float a[16][16], b[16][16], d[16][16];
  gather<FragA>(args, 1, a);
  gather<FragB>(args, 2, b);
  gather<FragC>(args, 3, d);
  multiply_accumulate(a, b, d);
  for (int lane = 0; lane < 32; ++lane) {
    auto& frag = *static_cast<FragD*>(static_cast<void* const*>(args[lane])[0]);
    for (int e = 0; e < FragD::num_elements; ++e) {
      const int index = layout_of<typename FragD::use>()[lane * FragD::num_elements + e];
      frag.x[e] = d[index / FragD::cols][index % FragD::cols];
    }
  }
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& frag, const T& value) {
  for (auto& e : frag.x) e = value;
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& frag, const T* pointer, unsigned ldm) {
  static_assert(!std::is_void<Layout>::value, "matrix_a / matrix_b fragments carry their layout");
  detail::MemoryArgs args{&frag, const_cast<T*>(pointer), ldm, std::is_same<Layout, col_major>::value};
  ::simt::detail::warp_sync_op("wmma::load_matrix_sync", 0xFFFFFFFFu,
                               detail::complete_load<fragment<Use, M, N, K, T, Layout>>, &args);
}

template <int M, int N, int K, typename T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& frag, const T* pointer, unsigned ldm, layout_t layout) {
  detail::MemoryArgs args{&frag, const_cast<T*>(pointer), ldm, layout == mem_col_major};
  ::simt::detail::warp_sync_op("wmma::load_matrix_sync", 0xFFFFFFFFu,
                               detail::complete_load<fragment<accumulator, M, N, K, T>>, &args);
}

template <int M, int N, int K, typename T>
void store_matrix_sync(T* pointer, const fragment<accumulator, M, N, K, T>& frag, unsigned ldm, layout_t layout) {
  detail::MemoryArgs args{const_cast<fragment<accumulator, M, N, K, T>*>(&frag), pointer, ldm,
                          layout == mem_col_major};
  ::simt::detail::warp_sync_op("wmma::store_matrix_sync", 0xFFFFFFFFu,
                               detail::complete_store<fragment<accumulator, M, N, K, T>>, &args);
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC>& c) {
  void* args[4] = {&d, const_cast<void*>(static_cast<const void*>(&a)),
                   const_cast<void*>(static_cast<const void*>(&b)), const_cast<void*>(static_cast<const void*>(&c))};
  using D = fragment<accumulator, M, N, K, TC>;
  ::simt::detail::warp_sync_op("wmma::mma_sync", 0xFFFFFFFFu,
                               detail::complete_mma<D, fragment<matrix_a, M, N, K, TA, LA>,
                                                    fragment<matrix_b, M, N, K, TB, LB>, D>,
                               args);
}

}  // namespace wmma
}  // namespace nvcuda
