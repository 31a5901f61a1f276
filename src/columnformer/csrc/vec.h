// Vectors for the C++ kernels: one 256-bit vector of float or double lanes through GCC/Clang vector
// extensions (an AVX2 / AVX-512VL register on x86, two NEON registers on ARM), loads and stores that
// need no alignment. Shared by fused_sparse.cpp and column_ops.cpp.
#pragma once

#include <algorithm>
#include <cmath>
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

// exp(x) in float by a Cephes-style polynomial (|rel. error| < 2e-7, 0 below -87.3, where expf is subnormal): plain
// arithmetic, so loops over arrays of it vectorise (omp simd). Shared by the attention softmax and the GELU.
inline float exp_poly(float x) {
  const float xc = std::min(std::max(x, -87.3f), 88.3f);
  const float fx = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float p2;
  std::memcpy(&p2, &bits, sizeof p2);
  return x < -87.3f ? 0.0f : y * p2;
}


}  // namespace columnformer_native
