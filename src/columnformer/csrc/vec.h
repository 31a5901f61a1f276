// Vectors for the C++ kernels: one 256-bit vector of float or double lanes through GCC/Clang vector
// extensions (an AVX2 / AVX-512VL register on x86, two NEON registers on ARM), loads and stores that
// need no alignment. Shared by fused_sparse.cpp and column_ops.cpp.
#pragma once

#include <cstdint>
#include <cstring>

namespace columnformer_native {

typedef float vfloat __attribute__((vector_size(32)));
typedef double vdouble __attribute__((vector_size(32)));
template <typename T> struct VecOf;
template <> struct VecOf<float> { using type = vfloat; };
template <> struct VecOf<double> { using type = vdouble; };
template <typename T> using Vec = typename VecOf<T>::type;
template <typename T> constexpr int64_t LW = 32 / sizeof(T);  // lanes per vector

template <typename T> inline Vec<T> vload(const T* p) { Vec<T> v; std::memcpy(&v, p, sizeof v); return v; }
template <typename T> inline void vstore(T* p, const Vec<T>& v) { std::memcpy(p, &v, sizeof v); }

constexpr int64_t GRAIN = 64;  // columns per task of the thread pool

}  // namespace columnformer_native
