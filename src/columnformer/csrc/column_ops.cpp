// Per-column layers for the CPU (columnformer/layers.py's untied linear and layer norm): every column n
// owns its weights, so a layer is N tiny independent problems — (B, I) @ (I, O) per column at batch B.
// torch's batched GEMM packs both operands of every one of them (more time than the multiply at B = 8) and
// a layer norm with a per-column affine is five or six passes over (N, B, C) tensors; here each column is
// one pass over its rows in registers and cache, one thread per column (no atomics: results do not
// depend on the thread count).
//
//   linear_forward:   y[n] = x[n] @ w[n] + b[n]                       x (N, B, I), w (N, I, O), b (N, O)
//   linear_backward:  dx[n] = g[n] @ w[n]^T;  dw_p[n] (+)= x[n]^T g[n][:, part p];  db[n] (+)= sum_b g[n]
//   with gelu_input, x is a pre-activation h and the layer reads GELU(h) (the MLP's second layer): y = GELU(h) @ w
//   + b, dh = (g @ w^T) * GELU'(h), dw (+)= GELU(h)^T g -- GELU(h) is computed per column in cache, never stored
//   norm_forward:     y = (x - mean) * rstd * w[n] + b[n] over the C channels of every row; saves mean, rstd
//   norm_backward:    gx, gw[n] = sum_b g xhat, gb[n] = sum_b g from x, mean, rstd (xhat recomputed)
//
// The small GEMMs keep an RM x RN tile of the output (rows x vectors) in registers while the reduction
// dimension streams past; the left operand is read one scalar at a time (broadcast), so any strides work.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

using namespace columnformer_native;

// C[m, :] = (acc_in ? C[m, :] : bias) + sum_k A[m * as + k * ks] * Bm[k * ldb + :]  for RM rows, RN vectors
template <typename T, int RM, int RN>
inline void tile(int64_t Kd, const T* __restrict A, int64_t as, int64_t ks, const T* __restrict Bm, int64_t ldb,
                 T* __restrict C, int64_t ldc, bool acc_in, const T* __restrict bias) {
  constexpr int64_t W = LW<T>;
  Vec<T> acc[RM][RN];
  for (int r = 0; r < RM; ++r)
    for (int t = 0; t < RN; ++t)
      acc[r][t] = acc_in ? vload(C + r * ldc + t * W) : (bias ? vload(bias + t * W) : Vec<T>{});
  for (int64_t k = 0; k < Kd; ++k) {
    Vec<T> bv[RN];
    for (int t = 0; t < RN; ++t) bv[t] = vload(Bm + k * ldb + t * W);
#pragma GCC unroll 16
    for (int r = 0; r < RM; ++r) {
      const T a = A[r * as + k * ks];
      for (int t = 0; t < RN; ++t) acc[r][t] += a * bv[t];
    }
  }
  for (int r = 0; r < RM; ++r)
    for (int t = 0; t < RN; ++t) vstore(C + r * ldc + t * W, acc[r][t]);
}

// all M rows of one vector band, RM rows at a time (remainder rows by smaller tiles)
template <typename T, int RM, int RN>
inline void band(int64_t M, int64_t Kd, const T* A, int64_t as, int64_t ks, const T* Bm, int64_t ldb, T* C,
                 int64_t ldc, bool acc_in, const T* bias) {
  int64_t m = 0;
  for (; m + RM <= M; m += RM) tile<T, RM, RN>(Kd, A + m * as, as, ks, Bm, ldb, C + m * ldc, ldc, acc_in, bias);
  for (; m + 4 <= M; m += 4) tile<T, 4, RN>(Kd, A + m * as, as, ks, Bm, ldb, C + m * ldc, ldc, acc_in, bias);
  for (; m < M; ++m) tile<T, 1, RN>(Kd, A + m * as, as, ks, Bm, ldb, C + m * ldc, ldc, acc_in, bias);
}

#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int RM4 = 6;  // rows of a 4-vector tile: 24 accumulators of 32 vector registers
#else
constexpr int RM4 = 3;  // 12 of 16
#endif

// C (M, Nn; row stride ldc) = [C +] A (M, Kd; strides as, ks) @ Bm (Kd, Nn; row stride ldb) [+ bias (Nn,)]
template <typename T>
void small_gemm(int64_t M, int64_t Kd, int64_t Nn, const T* A, int64_t as, int64_t ks, const T* Bm, int64_t ldb,
                T* C, int64_t ldc, bool acc_in, const T* bias) {
  constexpr int64_t W = LW<T>;
  int64_t n = 0;
  for (; n + 4 * W <= Nn; n += 4 * W)
    band<T, RM4, 4>(M, Kd, A, as, ks, Bm + n, ldb, C + n, ldc, acc_in, bias ? bias + n : nullptr);
  for (; n + 2 * W <= Nn; n += 2 * W)
    band<T, 8, 2>(M, Kd, A, as, ks, Bm + n, ldb, C + n, ldc, acc_in, bias ? bias + n : nullptr);
  for (; n + W <= Nn; n += W)
    band<T, 16, 1>(M, Kd, A, as, ks, Bm + n, ldb, C + n, ldc, acc_in, bias ? bias + n : nullptr);
  for (; n < Nn; ++n)  // columns past the last whole vector
    for (int64_t m = 0; m < M; ++m) {
      T s = acc_in ? C[m * ldc + n] : (bias ? bias[n] : T(0));
      for (int64_t k = 0; k < Kd; ++k) s += A[m * as + k * ks] * Bm[k * ldb + n];
      C[m * ldc + n] = s;
    }
}

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols. Float: whole 8 x 8 blocks by shuffles in
// registers (24 per block); the rest, and double, by scalar moves (a vectorised loop would need scattered
// stores or gathered loads, slower than either on x86).
template <typename T>
__attribute__((optimize("no-tree-vectorize"))) void transpose_scalar(const T* __restrict src, int64_t r0, int64_t r1,
                                                                     int64_t c0, int64_t c1, int64_t lds,
                                                                     T* __restrict dst, int64_t ldd) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c = c0; c < c1; ++c) dst[c * ldd + r] = src[r * lds + c];
}

inline void transpose8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  typedef int32_t vmask __attribute__((vector_size(32)));
  vfloat r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = vload(src + i * lds);
  for (int i = 0; i < 8; i += 2) {  // interleave row pairs
    t[i] = __builtin_shuffle(r[i], r[i + 1], vmask{0, 8, 1, 9, 4, 12, 5, 13});
    t[i + 1] = __builtin_shuffle(r[i], r[i + 1], vmask{2, 10, 3, 11, 6, 14, 7, 15});
  }
  for (int i = 0; i < 8; i += 4)  // pairs of pairs
    for (int j = 0; j < 2; ++j) {
      u[i + 2 * j] = __builtin_shuffle(t[i + j], t[i + j + 2], vmask{0, 1, 8, 9, 4, 5, 12, 13});
      u[i + 2 * j + 1] = __builtin_shuffle(t[i + j], t[i + j + 2], vmask{2, 3, 10, 11, 6, 7, 14, 15});
    }
  for (int i = 0; i < 4; ++i) {  // 128-bit halves
    vstore(dst + i * ldd, __builtin_shuffle(u[i], u[i + 4], vmask{0, 1, 2, 3, 8, 9, 10, 11}));
    vstore(dst + (i + 4) * ldd, __builtin_shuffle(u[i], u[i + 4], vmask{4, 5, 6, 7, 12, 13, 14, 15}));
  }
}

template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd) {
  int64_t r8 = 0, c8 = 0;
  if constexpr (std::is_same_v<T, float>) {
    r8 = rows / 8 * 8;
    c8 = cols / 8 * 8;
    for (int64_t r = 0; r < r8; r += 8)
      for (int64_t c = 0; c < c8; c += 8) transpose8x8(src + r * lds + c, lds, dst + c * ldd + r, ldd);
  }
  transpose_scalar(src, 0, r8, c8, cols, lds, dst, ldd);
  transpose_scalar(src, r8, rows, 0, cols, lds, dst, ldd);
}

// With A, a = GELU(x) = x Phi(x) (the exact, erf form, as torch's default) over n values; with D, da = GELU'(x) =
// Phi(x) + x phi(x). float: erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7) with exp_poly, one exp for both,
// vectorised; double: std::erf and std::exp.
template <bool A, bool D>
inline void gelu_rows(const float* __restrict x, float* __restrict a, float* __restrict da, int64_t n) {
  _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) {
    const float v = x[i], z = std::fabs(v) * 0.70710678118654752f;
    const float t = 1.0f / (1.0f + 0.3275911f * z);
    const float e = exp_poly(-z * z);  // exp(-x^2 / 2)
    const float p = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
    const float erf_abs = 1.0f - p * e;
    const float cdf = 0.5f + 0.5f * (v < 0.0f ? -erf_abs : erf_abs);
    if constexpr (A) a[i] = v * cdf;
    if constexpr (D) da[i] = cdf + v * e * 0.39894228040143268f;
  }
}
template <bool A, bool D>
inline void gelu_rows(const double* __restrict x, double* __restrict a, double* __restrict da, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double v = x[i], cdf = 0.5 * (1.0 + std::erf(v * 0.70710678118654752440));
    if constexpr (A) a[i] = v * cdf;
    if constexpr (D) da[i] = cdf + v * std::exp(-0.5 * v * v) * 0.39894228040143267794;
  }
}

void check_linear(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "column ops run on CPU tensors");
  TORCH_CHECK(x.dim() == 3 && w.dim() == 3 && w.size(0) == x.size(0) && w.size(1) == x.size(2),
              "x must be (N, B, I) and w (N, I, O)");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.scalar_type() == w.scalar_type(),
              "x and w must be contiguous and share one dtype");
}

}  // namespace

// y (N, B, O) = x (N, B, I) @ w (N, I, O) + b (N, O) (b may be empty); gelu_input: GELU(x) @ w + b
torch::Tensor linear_forward(torch::Tensor x, torch::Tensor w, torch::Tensor b, bool gelu_input) {
  check_linear(x, w);
  const int64_t N = x.size(0), B = x.size(1), I = x.size(2), O = w.size(2);
  TORCH_CHECK(b.numel() == 0 || (b.sizes() == torch::IntArrayRef({N, O}) && b.is_contiguous() &&
                                 b.scalar_type() == x.scalar_type()), "b must be empty or contiguous (N, O)");
  auto y = torch::empty({N, B, O}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "column_linear_forward", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    const scalar_t* bp = b.numel() ? b.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
      std::vector<scalar_t> act(gelu_input ? B * I : 0);
      for (int64_t n = n0; n < n1; ++n) {
        const scalar_t* xn = xp + n * B * I;
        if (gelu_input) {
          gelu_rows<true, false>(xn, act.data(), nullptr, B * I);
          xn = act.data();
        }
        small_gemm<scalar_t>(B, I, O, xn, I, 1, wp + n * I * O, O, yp + n * B * O, O, false, bp ? bp + n * O : nullptr);
      }
    });
  });
  return y;
}

// Returns dx (N, B, I) = g @ w^T (empty unless need_dx). dws: the weight gradients of the parts of O
// (e.g. query and key concatenated), part p (N, I, O_p) += (or = unless accumulate) x^T g[:, :, part p];
// db (N, O) likewise with sum_b g (empty: not wanted). g (N, B, O) contiguous. gelu_input: x is the pre-activation
// h of a layer that read GELU(h); dx is then dh = (g @ w^T) * GELU'(h) and the weight gradient GELU(h)^T g.
torch::Tensor linear_backward(torch::Tensor x, torch::Tensor w, torch::Tensor g, std::vector<torch::Tensor> dws,
                              torch::Tensor db, bool need_dx, bool accumulate, bool gelu_input) {
  check_linear(x, w);
  const int64_t N = x.size(0), B = x.size(1), I = x.size(2), O = w.size(2);
  TORCH_CHECK(g.sizes() == torch::IntArrayRef({N, B, O}) && g.is_contiguous() && g.scalar_type() == x.scalar_type(),
              "g must be contiguous (N, B, O) in x's dtype");
  int64_t total = 0;
  for (const auto& d : dws) {
    TORCH_CHECK(d.dim() == 3 && d.size(0) == N && d.size(1) == I && d.is_contiguous() && d.scalar_type() == x.scalar_type(),
                "every weight gradient must be contiguous (N, I, O_p)");
    total += d.size(2);
  }
  TORCH_CHECK(dws.empty() || total == O, "the weight gradients' parts must add up to O");
  TORCH_CHECK(db.numel() == 0 || (db.sizes() == torch::IntArrayRef({N, O}) && db.is_contiguous() &&
                                  db.scalar_type() == x.scalar_type()), "db must be empty or contiguous (N, O)");
  auto dx = need_dx ? torch::empty({N, B, I}, x.options()) : torch::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "column_linear_backward", [&] {
    constexpr int64_t W = LW<scalar_t>;
    const int64_t Bp = (B + W - 1) / W * W;  // batch rows padded to whole vectors for the transposed products
    const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>();
    scalar_t* dxp = need_dx ? dx.data_ptr<scalar_t>() : nullptr;
    scalar_t* dbp = db.numel() ? db.data_ptr<scalar_t>() : nullptr;
    std::vector<scalar_t*> dwp;
    std::vector<int64_t> width;
    for (auto& d : dws) {
      dwp.push_back(d.data_ptr<scalar_t>());
      width.push_back(d.size(2));
    }
    if (dxp)  // pass 1: dx^T (I, Bp) = w (I, O) @ g^T (O, Bp), g transposed in cache (B*O moves, not I*O)
      at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
        std::vector<scalar_t> gt(O * Bp, scalar_t(0)), dxt(I * Bp), dact(gelu_input ? B * I : 0);
        for (int64_t n = n0; n < n1; ++n) {
          transpose(gp + n * B * O, B, O, O, gt.data(), Bp);
          small_gemm<scalar_t>(I, O, Bp, wp + n * I * O, O, 1, gt.data(), Bp, dxt.data(), Bp, false, nullptr);
          scalar_t* dxn = dxp + n * B * I;
          transpose(dxt.data(), I, B, Bp, dxn, I);
          if (gelu_input) {  // dh = da * GELU'(h)
            scalar_t* da = dact.data();
            gelu_rows<false, true>(xp + n * B * I, nullptr, da, B * I);
            _Pragma("omp simd") for (int64_t i = 0; i < B * I; ++i) dxn[i] *= da[i];
          }
        }
      });
    // pass 2: the weight and bias gradients
    if (!dwp.empty() || dbp)
      at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
        std::vector<scalar_t> act(gelu_input ? B * I : 0);
        for (int64_t n = n0; n < n1; ++n) {
          const scalar_t *gn = gp + n * B * O, *xn = xp + n * B * I;
          if (gelu_input) {  // the layer's input GELU(h), recomputed
            gelu_rows<true, false>(xn, act.data(), nullptr, B * I);
            xn = act.data();
          }
          int64_t off = 0;
          for (size_t p = 0; p < dwp.size(); ++p) {  // dw_p (I, O_p) (+)= x^T (I, B) @ g[:, off:off+O_p]
            small_gemm<scalar_t>(I, B, width[p], xn, 1, I, gn + off, O, dwp[p] + n * I * width[p], width[p], accumulate,
                                 nullptr);
            off += width[p];
          }
          if (dbp) {  // db (+)= sum_b g[b, :], row after row (vectorised along O; each value's sum in b order)
            scalar_t* dbn = dbp + n * O;
            if (!accumulate) std::fill(dbn, dbn + O, scalar_t(0));
            for (int64_t b = 0; b < B; ++b) {
              const scalar_t* gb = gn + b * O;
              _Pragma("omp simd") for (int64_t o = 0; o < O; ++o) dbn[o] += gb[o];
            }
          }
        }
      });
  });
  return dx;
}

// (y (N, B, C), mean (N, B, 1), rstd (N, B, 1)) of a layer norm over C with a per-column affine w, b (N, C)
std::vector<torch::Tensor> norm_forward(torch::Tensor x, torch::Tensor w, torch::Tensor b, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.is_contiguous(), "x must be a contiguous (N, B, C) CPU tensor");
  const int64_t N = x.size(0), B = x.size(1), C = x.size(2);
  TORCH_CHECK(w.sizes() == torch::IntArrayRef({N, C}) && b.sizes() == w.sizes() && w.is_contiguous() && b.is_contiguous() &&
                  w.scalar_type() == x.scalar_type() && b.scalar_type() == x.scalar_type(),
              "w, b must be contiguous (N, C) in x's dtype");
  auto y = torch::empty_like(x);
  auto mean = torch::empty({N, B, 1}, x.options());
  auto rstd = torch::empty({N, B, 1}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "column_norm_forward", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>(), *bp = b.data_ptr<scalar_t>();
    scalar_t *yp = y.data_ptr<scalar_t>(), *mp = mean.data_ptr<scalar_t>(), *rp = rstd.data_ptr<scalar_t>();
    const scalar_t e = static_cast<scalar_t>(eps);
    at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const scalar_t *wn = wp + n * C, *bn = bp + n * C;
        for (int64_t r = n * B; r < (n + 1) * B; ++r) {
          const scalar_t* xr = xp + r * C;
          scalar_t s = 0;
          _Pragma("omp simd reduction(+ : s)")
          for (int64_t c = 0; c < C; ++c) s += xr[c];
          const scalar_t mu = s / C;
          scalar_t v = 0;
          _Pragma("omp simd reduction(+ : v)")
          for (int64_t c = 0; c < C; ++c) v += (xr[c] - mu) * (xr[c] - mu);
          const scalar_t rs = scalar_t(1) / std::sqrt(v / C + e);
          scalar_t* yr = yp + r * C;
          _Pragma("omp simd")
          for (int64_t c = 0; c < C; ++c) yr[c] = (xr[c] - mu) * rs * wn[c] + bn[c];
          mp[r] = mu;
          rp[r] = rs;
        }
      }
    });
  });
  return {y, mean, rstd};
}

// (gx, gw, gb) of norm_forward from its input, statistics, weight and the output gradient g
std::vector<torch::Tensor> norm_backward(torch::Tensor g, torch::Tensor x, torch::Tensor mean, torch::Tensor rstd,
                                         torch::Tensor w, bool need_x, bool need_w, bool need_b) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && g.sizes() == x.sizes() && g.is_contiguous() &&
                  g.scalar_type() == x.scalar_type(), "g, x must be contiguous (N, B, C) in one dtype");
  const int64_t N = x.size(0), B = x.size(1), C = x.size(2);
  TORCH_CHECK(mean.numel() == N * B && rstd.numel() == N * B && mean.is_contiguous() && rstd.is_contiguous() &&
                  w.sizes() == torch::IntArrayRef({N, C}) && w.is_contiguous(), "mean, rstd must be (N, B, 1) and w (N, C)");
  auto none = torch::empty({0}, x.options());
  auto gx = need_x ? torch::empty_like(x) : none;
  auto gw = need_w ? torch::empty({N, C}, x.options()) : none;
  auto gb = need_b ? torch::empty({N, C}, x.options()) : none;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "column_norm_backward", [&] {
    const scalar_t *gp = g.data_ptr<scalar_t>(), *xp = x.data_ptr<scalar_t>(), *mp = mean.data_ptr<scalar_t>(),
                   *rp = rstd.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    scalar_t* gxp = need_x ? gx.data_ptr<scalar_t>() : nullptr;
    scalar_t* gwp = need_w ? gw.data_ptr<scalar_t>() : nullptr;
    scalar_t* gbp = need_b ? gb.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
      std::vector<scalar_t> xh(C), gh(C), sw(C), sb(C);
      for (int64_t n = n0; n < n1; ++n) {
        const scalar_t* wn = wp + n * C;
        std::fill(sw.begin(), sw.end(), scalar_t(0));
        std::fill(sb.begin(), sb.end(), scalar_t(0));
        for (int64_t r = n * B; r < (n + 1) * B; ++r) {
          const scalar_t *xr = xp + r * C, *gr = gp + r * C;
          const scalar_t mu = mp[r], rs = rp[r];
          scalar_t m1 = 0, m2 = 0;
          _Pragma("omp simd reduction(+ : m1, m2)")
          for (int64_t c = 0; c < C; ++c) {
            xh[c] = (xr[c] - mu) * rs;
            gh[c] = gr[c] * wn[c];
            sw[c] += gr[c] * xh[c];
            sb[c] += gr[c];
            m1 += gh[c];
            m2 += gh[c] * xh[c];
          }
          if (gxp) {
            m1 /= C;
            m2 /= C;
            scalar_t* gxr = gxp + r * C;
            _Pragma("omp simd")
            for (int64_t c = 0; c < C; ++c) gxr[c] = rs * (gh[c] - m1 - xh[c] * m2);
          }
        }
        if (gwp) std::copy(sw.begin(), sw.end(), gwp + n * C);
        if (gbp) std::copy(sb.begin(), sb.end(), gbp + n * C);
      }
    });
  });
  return {gx, gw, gb};
}

// The fused attention kernel's layout: x (N, R, d) with unit stride along d (any column and row strides, e.g. a
// slice of a wider projection) -> (N, d, P), every column's (R, d) block transposed, lanes R..P-1 zero.
torch::Tensor to_lanes(torch::Tensor x, int64_t P) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.stride(2) == 1 && P >= x.size(1), "x must be (N, R, d) with unit stride along d, P >= R");
  const int64_t N = x.size(0), R = x.size(1), d = x.size(2), sn = x.stride(0), sr = x.stride(1);
  auto out = torch::empty({N, d, P}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "to_lanes", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        scalar_t* on = op + n * d * P;
        transpose(xp + n * sn, R, d, sr, on, P);
        if (P > R)
          for (int64_t c = 0; c < d; ++c) std::fill(on + c * P + R, on + (c + 1) * P, scalar_t(0));
      }
    });
  });
  return out;
}

// Back: y (N, d, P) contiguous -> (N, R, d) contiguous, lanes R..P-1 dropped.
torch::Tensor from_lanes(torch::Tensor y, int64_t R) {
  TORCH_CHECK(y.device().is_cpu() && y.dim() == 3 && y.is_contiguous() && R <= y.size(2), "y must be contiguous (N, d, P), R <= P");
  const int64_t N = y.size(0), d = y.size(1), P = y.size(2);
  auto out = torch::empty({N, R, d}, y.options());
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "from_lanes", [&] {
    const scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) transpose(yp + n * d * P, d, R, P, op + n * R * d, d);
    });
  });
  return out;
}
