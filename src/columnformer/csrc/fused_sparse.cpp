// Fused sparse attention for the CPU: the gather kernel's math (columnformer/sparse_attention.py) with
// every column's K edges scored, normalised and summed in one pass over registers and cache, instead of
// torch ops over gathered (chunk, K, B*H, d) tensors.
//
// Layout: columns first, the B*H lanes innermost and padded with zeros to P lanes (a power-of-two number
// of 256-bit vectors), contiguous: q, k: (N, d, P); v: (N, dv, P); index, valid, bias, W: (N, K). Every dot
// product is then a vector over lanes (no horizontal sums); padding lanes are left out of every sum.
//   s[n, e, bh] = <q[n, bh], k[index[n, e], bh]> * scale + bias[n, e]      (valid edges only)
//   lse[n, bh]  = log sum_e exp(s[n, e, bh]);   A = exp(s - lse)
//   out[n, bh]  = sum_e A v[index[n, e], bh]
//   per column: wiring[n] = sum_{e, bh} A W[n, e];  entropy[n] = sum_{e, bh} -A log A
// Backward recomputes the scores from the saved log-sum-exp (nothing of size N*K*BH is kept). One pass
// (backward_one_pass, below) where the blocks of the visiting order can be coloured; else two passes:
//   pass 1, over reading columns n:  dA = <g[n], v[src]> + gw W,  D = sum_e A dA,  ds = A (dA - D),
//                                    dq[n] = scale sum_e ds k[src],  dbias[n, e] = sum_bh ds,  dW = gw sum_bh A
//   pass 2, over source columns s (the inverted edge table rev/qry): dk[s] = scale sum ds q[n],
//                                    dv[s] = sum A g[n]  -- every output row owned by one thread, no atomics.
// Threads: at::parallel_for over columns (torch's intra-op pool). Columns are visited in `order`
// (e.g. tiles of nearby columns), so the keys and values a thread reads stay in cache.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "vec.h"

namespace {

using namespace columnformer_native;

// exp over an array, vectorised (exp_poly: vec.h); double calls std::exp.
inline void exp_inplace(float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = exp_poly(x[i]);
}
inline void exp_inplace(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}


template <typename T>
struct Edges {
  const int64_t* index;
  const bool* valid;  // null: every edge valid
  const T* bias;      // null: no bias
  const T* W;
  int64_t K;
  inline bool ok(int64_t n, int64_t e) const { return valid == nullptr || valid[n * K + e]; }
  inline T b(int64_t n, int64_t e) const { return bias == nullptr ? T(0) : bias[n * K + e]; }
};

// The backward pass's outputs as pointers: null where that gradient is not needed (its tensor is empty).
template <typename T>
struct Grads {
  T *dq, *dk, *dv, *dbias, *dW;
  static T* ptr(torch::Tensor& t) { return t.numel() ? t.data_ptr<T>() : nullptr; }
  Grads(torch::Tensor& q, torch::Tensor& k, torch::Tensor& v, torch::Tensor& b, torch::Tensor& w)
      : dq(ptr(q)), dk(ptr(k)), dv(ptr(v)), dbias(ptr(b)), dW(ptr(w)) {}
};

// Rows are (L, P) with the lanes (batch x head) innermost, padded with zeros to P = LW * nb lanes: nb blocks
// of LW lanes, nb a power of two. One block of one row is one 256-bit vector (GCC/Clang vector extensions:
// an AVX2/AVX-512VL register on x86), so every product below is a vector over lanes and nothing needs a
// horizontal sum until the per-edge and per-column reductions. Per-edge quantities (scores, A) are
// (edges, P) buffers. In the forward pass the sum over edges keeps RB vectors of the output in registers
// while the edges stream past (register blocking: each edge costs one load and one FMA per vector of the
// output, never a load and a store of the accumulator) and the reductions over edges (max, sum) run per
// lane block in registers. The backward pass keeps its accumulators in memory (lane_axpy below): a
// register-blocked backward was measured no faster on a Zen 4 CPU, where both passes are bound
// by gathering the K source rows of every column from L2.
#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int RB = 16;  // result vectors held in registers (32 vector registers)
#else
constexpr int RB = 8;   // 16 vector registers
#endif


// y[f] = sum_j c[j * P + f % P] * rows[j][f] over the n * P elements f of n rows (written, not added);
// c is (m, P). Tiles of RB vectors; a tile's vector t uses lane block (v0 + t) & (nb - 1) of c[j].
template <typename T, int L>
inline void weighted_rows(const T* __restrict c, const T* const* rows, int64_t m, int64_t n, int64_t P, T* __restrict y) {
  if constexpr (L > 0) n = L;
  constexpr int64_t W = LW<T>;
  const int64_t nv = n * P / W, mask = P / W - 1;
  int64_t v0 = 0;
  for (; v0 + RB <= nv; v0 += RB) {
    Vec<T> acc[RB] = {};
    if (mask == 0) {  // one lane block: one coefficient vector per edge
      for (int64_t j = 0; j < m; ++j) {
        const Vec<T> cj = vload(c + j * P);
        const T* x = rows[j] + v0 * W;
#pragma GCC unroll 16
        for (int t = 0; t < RB; ++t) acc[t] += cj * vload(x + t * W);
      }
    } else {
      for (int64_t j = 0; j < m; ++j) {
        const T *cj = c + j * P, *x = rows[j] + v0 * W;
#pragma GCC unroll 16
        for (int t = 0; t < RB; ++t) acc[t] += vload(cj + ((v0 + t) & mask) * W) * vload(x + t * W);
      }
    }
    for (int t = 0; t < RB; ++t) vstore(y + (v0 + t) * W, acc[t]);
  }
  if (v0 < nv) {
    const int64_t rem = nv - v0;
    Vec<T> acc[RB] = {};
    for (int64_t j = 0; j < m; ++j) {
      const T *cj = c + j * P, *x = rows[j] + v0 * W;
      for (int64_t t = 0; t < rem; ++t) acc[t] += vload(cj + ((v0 + t) & mask) * W) * vload(x + t * W);
    }
    for (int64_t t = 0; t < rem; ++t) vstore(y + (v0 + t) * W, acc[t]);
  }
}

// acc[h] = sum_i x[i, h] y[i, h], block by block (the dot products of both passes)
template <typename T, int L>
inline void lane_dot(const T* __restrict x, const T* __restrict y, T* __restrict acc, int64_t n, int64_t P) {
  if constexpr (L > 0) n = L;
  for (int64_t b = 0; b < P; b += LW<T>) {
    T r[LW<T>] = {};
    for (int64_t i = 0; i < n; ++i)
#pragma omp simd
      for (int64_t l = 0; l < LW<T>; ++l) r[l] += x[i * P + b + l] * y[i * P + b + l];
#pragma omp simd
    for (int64_t l = 0; l < LW<T>; ++l) acc[b + l] = r[l];
  }
}

// y[i, h] += c[h] x[i, h] (the backward pass's sums over edges, accumulators in memory)
template <typename T, int L>
inline void lane_axpy(const T* __restrict c, const T* __restrict x, T* __restrict y, int64_t n, int64_t P) {
  if constexpr (L > 0) n = L;
  for (int64_t b = 0; b < P; b += LW<T>) {
    T cb[LW<T>];
#pragma omp simd
    for (int64_t l = 0; l < LW<T>; ++l) cb[l] = c[b + l];
    for (int64_t i = 0; i < n; ++i)
#pragma omp simd
      for (int64_t l = 0; l < LW<T>; ++l) y[i * P + b + l] += cb[l] * x[i * P + b + l];
  }
}

// Scores of column n into s[e * BH + h] (-inf on invalid edges).
template <typename T, int D>
inline void scores(const Edges<T>& E, const T* q, const T* k, int64_t n, int64_t BH, int64_t d, T scale, T* s) {
  const T* qn = q + n * d * BH;
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t e = 0; e < E.K; ++e) {
    T* se = s + e * BH;
    if (!E.ok(n, e)) {
      std::fill(se, se + BH, ninf);
      continue;
    }
    lane_dot<T, D>(qn, k + E.index[n * E.K + e] * d * BH, se, d, BH);
    const T be = E.b(n, e);
#pragma omp simd
    for (int64_t h = 0; h < BH; ++h) se[h] = se[h] * scale + be;
  }
}

// a[e, h] = exp(s[e, h] - off[h])
template <typename T>
inline void shifted_exp(const T* s, const T* off, T* a, int64_t K, int64_t BH) {
  for (int64_t e = 0; e < K; ++e)
#pragma omp simd
    for (int64_t h = 0; h < BH; ++h) a[e * BH + h] = s[e * BH + h] - off[h];
  exp_inplace(a, K * BH);
}


// the valid edges of column n: their slots e (into es), returns how many
template <typename T>
inline int64_t valid_edges(const Edges<T>& E, int64_t n, int64_t* __restrict es) {
  const int64_t K = E.K;
  if (E.valid == nullptr) {
    for (int64_t e = 0; e < K; ++e) es[e] = e;
    return K;
  }
  const bool* ok = E.valid + n * K;
  int64_t m = 0;
  for (int64_t e = 0; e < K; ++e)
    if (ok[e]) es[m++] = e;
  return m;
}

// The softmax over the m edges' scores s (m, P), per lane block with the reductions over edges in registers:
// a = exp(s - max) (unnormalised), ln = the log-sum-exp and z = 1 / sum; without valid edges (m = 0 or all -inf)
// ln = inf and z = 0, so A = 0 (also in backward).
template <typename T>
inline void edge_softmax(const T* s, T* a, T* mx, T* z, T* ln, int64_t m, int64_t P) {
  constexpr int64_t W = LW<T>;
  const T inf = std::numeric_limits<T>::infinity();
  for (int64_t h = 0; h < P; h += W) {
    Vec<T> y = Vec<T>{} - inf;
    for (int64_t j = 0; j < m; ++j) {
      const Vec<T> sj = vload(s + j * P + h);
      y = sj > y ? sj : y;
    }
    vstore(mx + h, y);
    for (int64_t j = 0; j < m; ++j) vstore(a + j * P + h, vload(s + j * P + h) - y);
  }
  exp_inplace(a, m * P);
  for (int64_t h = 0; h < P; h += W) {
    Vec<T> acc = {};
    for (int64_t j = 0; j < m; ++j) acc += vload(a + j * P + h);
    vstore(z + h, acc);
  }
  for (int64_t h = 0; h < P; ++h) {
    ln[h] = z[h] > 0 ? mx[h] + std::log(z[h]) : inf;
    z[h] = z[h] > 0 ? T(1) / z[h] : T(0);
  }
}

// After edge_softmax: A = a * z in place over the m valid edges (slots es), the column's wiring sum_{e, lanes} A W
// and entropy -sum A log A = lse - sum A s into wp[n], hp[n] (padding lanes not counted), A into probs when recorded.
template <typename T>
inline void edge_stats(const Edges<T>& E, int64_t n, const int64_t* es, int64_t m, const T* s, T* a, const T* z,
                       const T* ln, T* ws, T* sa, int64_t P, int64_t lanes, T* probs, T* wp, T* hp) {
  constexpr int64_t W = LW<T>;
  const int64_t K = E.K;
  for (int64_t h = 0; h < P; h += W) {
    const Vec<T> rz = vload(z + h);
    Vec<T> acc_w = {}, acc_s = {};
    for (int64_t j = 0; j < m; ++j) {
      const Vec<T> x = vload(a + j * P + h) * rz;
      vstore(a + j * P + h, x);
      acc_w += x * E.W[n * K + es[j]];
      acc_s += x * vload(s + j * P + h);
    }
    vstore(ws + h, acc_w);
    vstore(sa + h, acc_s);
  }
  if (probs) {
    std::fill(probs + n * lanes * K, probs + (n + 1) * lanes * K, T(0));
    for (int64_t j = 0; j < m; ++j)
      for (int64_t h = 0; h < lanes; ++h) probs[(n * lanes + h) * K + es[j]] = a[j * P + h];
  }
  T w = 0, ent = 0;
  for (int64_t h = 0; h < lanes; ++h) {  // padding lanes are not counted
    w += ws[h];
    if (z[h] > 0) ent += ln[h] - sa[h];
  }
  wp[n] = w;
  hp[n] = ent;
}

template <typename T, int D, int DV>
void forward_impl(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const Edges<T>& E,
                  const int64_t* order, T scale, int64_t lanes, torch::Tensor& out, torch::Tensor& lse,
                  torch::Tensor& colw, torch::Tensor& colh, T* probs) {
  const int64_t N = q.size(0), d = q.size(1), P = q.size(2), dv = v.size(1), K = E.K;
  constexpr int64_t W = LW<T>;
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  T *op = out.data_ptr<T>(), *lp = lse.data_ptr<T>(), *wp = colw.data_ptr<T>(), *hp = colh.data_ptr<T>();
  at::parallel_for(0, N, GRAIN, [&](int64_t i0, int64_t i1) {
    std::vector<T> s(K * P), a(K * P), mx(P), z(P), ws(P), sa(P);
    std::vector<const T*> vr(K);
    std::vector<int64_t> es(K);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = order ? order[i] : i;
      const int64_t m = valid_edges(E, n, es.data());
      const T* qn = qp + n * d * P;
      for (int64_t j = 0; j < m; ++j) {  // scores
        const int64_t e = es[j], src = E.index[n * K + e];
        T* sj = s.data() + j * P;
        lane_dot<T, D>(qn, kp + src * d * P, sj, d, P);
        const T be = E.b(n, e);
        for (int64_t h = 0; h < P; h += W) vstore(sj + h, vload(sj + h) * scale + be);
        vr[j] = vp + src * dv * P;
      }
      T* ln = lp + n * P;
      edge_softmax(s.data(), a.data(), mx.data(), z.data(), ln, m, P);
      edge_stats(E, n, es.data(), m, s.data(), a.data(), z.data(), ln, ws.data(), sa.data(), P, lanes, probs, wp, hp);
      weighted_rows<T, DV>(a.data(), vr.data(), m, dv, P, op + n * dv * P);
    }
  });
}

// ---------------------------------------------------------------- reader groups
// Neighbouring columns read nearly the same sources. A group of RG consecutive columns of the visiting order
// (a 2 x 2 square on a grid) is processed together against the union of its sources (`uni`, from
// sparse_reader_groups): each source row is loaded once per group instead of once per reading column, and
// every product runs for all readers of the group (a reader that does not read that source gets A = 0 there).
// The per-edge quantities (bias, softmax, wiring, entropy) stay in edge space; `slot` maps every edge to its
// source's position in the group's union, so duplicate edges add up as in the other kernels.
constexpr int RG = 4;

// su[r][u] = <q_r, k_u> over lane blocks: one load of every key vector for all RG readers
template <typename T, int D>
inline void group_dots(const T* const* xs, const T* y, T* __restrict out, int64_t stride, int64_t n, int64_t P) {
  if constexpr (D > 0) n = D;
  constexpr int64_t W = LW<T>;
  for (int64_t b = 0; b < P; b += W) {
    Vec<T> acc[2][RG] = {};  // two partial sums per reader: 2 * RG independent FMA chains of n / 2
    int64_t i = 0;
#pragma GCC unroll 8
    for (; i + 2 <= n; i += 2) {
      const Vec<T> y0 = vload(y + i * P + b), y1 = vload(y + (i + 1) * P + b);
#pragma GCC unroll 4
      for (int r = 0; r < RG; ++r) {
        acc[0][r] += vload(xs[r] + i * P + b) * y0;
        acc[1][r] += vload(xs[r] + (i + 1) * P + b) * y1;
      }
    }
    if (i < n) {
      const Vec<T> y0 = vload(y + i * P + b);
      for (int r = 0; r < RG; ++r) acc[0][r] += vload(xs[r] + i * P + b) * y0;
    }
    for (int r = 0; r < RG; ++r) vstore(out + r * stride + b, acc[0][r] + acc[1][r]);
  }
}

// ys[r][f] (=, or += with `add`) sum_u c[r][u][f % P] rows[u][f] over the n * P elements f of a row; c is
// (RG, U, P) with row stride cs = U * P. Tiles of TB vectors per reader in registers, each row vector loaded once.
template <typename T, int L>
inline void group_rows(const T* __restrict c, int64_t cs, const T* base, const int32_t* uni, int64_t rowlen,
                       int64_t uc, int64_t n, int64_t P, T* const* ys, bool add) {
  if constexpr (L > 0) n = L;
  constexpr int64_t W = LW<T>;
  constexpr int TB = 4;
  const int64_t nv = n * P / W, mask = P / W - 1;
  for (int64_t v0 = 0; v0 < nv; v0 += TB) {
    const int64_t tb = std::min<int64_t>(TB, nv - v0);
    Vec<T> acc[RG][TB] = {};
    if (tb == TB && mask == 0) {
      for (int64_t u = 0; u < uc; ++u) {
        const T* x = base + uni[u] * rowlen + v0 * W;
        Vec<T> xv[TB];
#pragma GCC unroll 4
        for (int t = 0; t < TB; ++t) xv[t] = vload(x + t * W);
#pragma GCC unroll 4
        for (int r = 0; r < RG; ++r) {
          const Vec<T> cr = vload(c + r * cs + u * P);
#pragma GCC unroll 4
          for (int t = 0; t < TB; ++t) acc[r][t] += cr * xv[t];
        }
      }
    } else {
      for (int64_t u = 0; u < uc; ++u) {
        const T* x = base + uni[u] * rowlen + v0 * W;
        for (int64_t t = 0; t < tb; ++t) {
          const Vec<T> xv = vload(x + t * W);
          for (int r = 0; r < RG; ++r) acc[r][t] += vload(c + r * cs + u * P + ((v0 + t) & mask) * W) * xv;
        }
      }
    }
    for (int r = 0; r < RG; ++r) {
      if (ys[r] == nullptr) continue;
      for (int64_t t = 0; t < tb; ++t) {
        T* y = ys[r] + (v0 + t) * W;
        vstore(y, add ? vload(y) + acc[r][t] : acc[r][t]);
      }
    }
  }
}

// rows[u][f] += sum_r c[r][u][f % P] xs[r][f] for every union row u (the backward pass's dk, dv): each row
// read and written once per group.
template <typename T, int L>
inline void group_scatter(const T* __restrict c, int64_t cs, T* base, const int32_t* uni, int64_t rowlen, int64_t uc,
                          int64_t n, int64_t P, const T* const* xs, int rc) {
  if constexpr (L > 0) n = L;
  constexpr int64_t W = LW<T>;
  const int64_t nv = n * P / W, mask = P / W - 1;
  if (rc == RG && mask == 0) {  // a full group, one lane block: four coefficient vectors per row, short FMA chains
    static_assert(RG == 4, "the unrolled sum below is written for 4 readers");
    for (int64_t u = 0; u < uc; ++u) {
      T* y = base + uni[u] * rowlen;
      const Vec<T> c0 = vload(c + u * P), c1 = vload(c + cs + u * P), c2 = vload(c + 2 * cs + u * P),
                   c3 = vload(c + 3 * cs + u * P);
#pragma GCC unroll 8
      for (int64_t t = 0; t < nv; ++t)
        vstore(y + t * W, vload(y + t * W) + ((c0 * vload(xs[0] + t * W) + c1 * vload(xs[1] + t * W)) +
                                              (c2 * vload(xs[2] + t * W) + c3 * vload(xs[3] + t * W))));
    }
    return;
  }
  for (int64_t u = 0; u < uc; ++u) {
    T* y = base + uni[u] * rowlen;
    for (int64_t t = 0; t < nv; ++t) {
      Vec<T> acc = vload(y + t * W);
      const int64_t cb = (t & mask) * W;
      for (int r = 0; r < rc; ++r) acc += vload(c + r * cs + u * P + cb) * vload(xs[r] + t * W);
      vstore(y + t * W, acc);
    }
  }
}

template <typename T, int D, int DV>
void forward_grouped(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const Edges<T>& E,
                     const int64_t* order, T scale, int64_t lanes, const int32_t* uni, const int32_t* ucount,
                     const int32_t* slot, int64_t U, torch::Tensor& out, torch::Tensor& lse, torch::Tensor& colw,
                     torch::Tensor& colh, T* probs) {
  const int64_t N = q.size(0), d = q.size(1), P = q.size(2), dv = v.size(1), K = E.K, G = (N + RG - 1) / RG;
  constexpr int64_t W = LW<T>;
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  T *op = out.data_ptr<T>(), *lp = lse.data_ptr<T>(), *wp = colw.data_ptr<T>(), *hp = colh.data_ptr<T>();
  at::parallel_for(0, G, GRAIN / RG, [&](int64_t g0, int64_t g1) {
    std::vector<T> su(RG * U * P), au(RG * U * P), s(K * P), a(K * P), mx(P), z(P), ws(P), sa(P);
    std::vector<int64_t> es(K);
    for (int64_t g = g0; g < g1; ++g) {
      const int rc = static_cast<int>(std::min<int64_t>(RG, N - g * RG));
      const int64_t uc = ucount[g];
      const int32_t* ug = uni + g * U;
      int64_t ns[RG];
      const T* qs[RG];
      T* ys[RG];
      for (int r = 0; r < RG; ++r) {
        const int64_t i = g * RG + std::min(r, rc - 1);  // a short last group repeats its last reader (unused)
        ns[r] = order ? order[i] : i;
        qs[r] = qp + ns[r] * d * P;
        ys[r] = r < rc ? op + ns[r] * dv * P : nullptr;
      }
      for (int64_t u = 0; u < uc; ++u) group_dots<T, D>(qs, kp + ug[u] * d * P, su.data() + u * P, U * P, d, P);
      std::fill(au.begin(), au.begin() + RG * U * P, T(0));
      for (int r = 0; r < rc; ++r) {
        const int64_t n = ns[r];
        const int64_t m = valid_edges(E, n, es.data());
        const int32_t* sl = slot + n * K;
        const T* sr = su.data() + r * U * P;
        for (int64_t j = 0; j < m; ++j) {
          const int64_t e = es[j];
          const T be = E.b(n, e);
          for (int64_t h = 0; h < P; h += W) vstore(s.data() + j * P + h, vload(sr + sl[e] * P + h) * scale + be);
        }
        T* ln = lp + n * P;
        edge_softmax(s.data(), a.data(), mx.data(), z.data(), ln, m, P);
        edge_stats(E, n, es.data(), m, s.data(), a.data(), z.data(), ln, ws.data(), sa.data(), P, lanes, probs, wp, hp);
        T* ar = au.data() + r * U * P;
        for (int64_t j = 0; j < m; ++j) {  // A into the union's rows (duplicate edges add)
          T* dst = ar + sl[es[j]] * P;
          for (int64_t h = 0; h < P; h += W) vstore(dst + h, vload(dst + h) + vload(a.data() + j * P + h));
        }
      }
      group_rows<T, DV>(au.data(), U * P, vp, ug, dv * P, uc, dv, P, ys, false);
    }
  });
}

// dS = A (dA - D) of one edge over its P lanes into c; returns (sum dS, sum A) over the first `lanes` lanes
// (the bias and wiring-weight gradients; padding lanes are not counted).
template <typename T>
inline std::pair<T, T> edge_ds(const T* ae, const T* dae, const T* Dn, T* c, int64_t P, int64_t lanes) {
  T sb = 0, sw = 0;
#pragma omp simd
  for (int64_t h = 0; h < P; ++h) c[h] = ae[h] * (dae[h] - Dn[h]);
  for (int64_t h = 0; h < lanes; ++h) {  // padding lanes are not counted
    sb += c[h];
    sw += ae[h];
  }
  return {sb, sw};
}

// The backward of one reading column n: its scores recomputed, A = exp(s - lse), dA = <g, v> + gw W, D = sum A dA
// (into Dn), dS = A (dA - D); dq[n] = scale sum dS k and its edges' bias and wiring-weight gradients written; where
// dk, dv are given (the one-pass backward, which owns the sources' rows) also dk[src] += scale dS q[n] and
// dv[src] += A g[n].
template <typename T, int D, int DV>
inline void reader_backward(const Edges<T>& E, const T* qp, const T* kp, const T* vp, const T* lp, const T* gp,
                            int64_t n, int64_t d, int64_t dv, int64_t BH, int64_t lanes, T scale, T gw, T* s, T* a,
                            T* da, T* c, T* Dn, T* dqp, T* dkp, T* dvp, T* dbp, T* dwp) {
  const int64_t K = E.K;
  const int64_t* src = E.index + n * K;
  scores<T, D>(E, qp, kp, n, BH, d, scale, s);
  shifted_exp(s, lp + n * BH, a, K, BH);
  const T *gn = gp + n * dv * BH, *qn = qp + n * d * BH;
  std::fill(Dn, Dn + BH, T(0));
  for (int64_t e = 0; e < K; ++e) {  // dA, D = sum_e A dA
    if (!E.ok(n, e)) continue;
    T* dae = da + e * BH;
    const T* ae = a + e * BH;
    lane_dot<T, DV>(gn, vp + src[e] * dv * BH, dae, dv, BH);
    const T gwe = gw * E.W[n * K + e];
#pragma omp simd
    for (int64_t h = 0; h < BH; ++h) {
      dae[h] += gwe;
      Dn[h] += ae[h] * dae[h];
    }
    if (dvp) lane_axpy<T, DV>(ae, gn, dvp + src[e] * dv * BH, dv, BH);
  }
  T* dqn = dqp ? dqp + n * d * BH : nullptr;
  if (dqn) std::fill(dqn, dqn + d * BH, T(0));
  for (int64_t e = 0; e < K; ++e) {  // dS = A (dA - D)
    if (!E.ok(n, e)) {
      if (dbp) dbp[n * K + e] = 0;
      if (dwp) dwp[n * K + e] = 0;
      continue;
    }
    const T* ae = a + e * BH;
    const auto [sb, sw] = edge_ds(ae, da + e * BH, Dn, c, BH, lanes);
#pragma omp simd
    for (int64_t h = 0; h < BH; ++h) c[h] *= scale;
    if (dqn) lane_axpy<T, D>(c, kp + src[e] * d * BH, dqn, d, BH);
    if (dkp) lane_axpy<T, D>(c, qn, dkp + src[e] * d * BH, d, BH);
    if (dbp) dbp[n * K + e] = sb;
    if (dwp) dwp[n * K + e] = gw * sw;
  }
}

template <typename T, int D, int DV>
void backward_impl(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const Edges<T>& E,
                   const int64_t* order, T scale, int64_t lanes, const torch::Tensor& lse, const torch::Tensor& g, T gw,
                   const torch::Tensor& rev, const torch::Tensor& qry, const Grads<T>& out) {
  const int64_t N = q.size(0), d = q.size(1), BH = q.size(2), dv = v.size(1), K = E.K;
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>(), *lp = lse.data_ptr<T>(),
          *gp = g.data_ptr<T>();
  auto D_ = torch::empty({N, BH}, q.options());
  T* Dp = D_.data_ptr<T>();
  T *dqp = out.dq, *dkp = out.dk, *dvp = out.dv, *dbp = out.dbias, *dwp = out.dW;
  // pass 1: reading columns
  at::parallel_for(0, N, GRAIN, [&](int64_t i0, int64_t i1) {
    std::vector<T> s(K * BH), a(K * BH), da(K * BH), c(BH);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = order ? order[i] : i;
      reader_backward<T, D, DV>(E, qp, kp, vp, lp, gp, n, d, dv, BH, lanes, scale, gw, s.data(), a.data(), da.data(),
                                c.data(), Dp + n * BH, dqp, nullptr, nullptr, dbp, dwp);
    }
  });
  if (!dkp && !dvp) return;
  // pass 2: source columns, each gathering the edges that leave it (padding of rev comes last)
  const int64_t R = rev.size(1), NK = N * K;
  const int64_t *rp = rev.data_ptr<int64_t>(), *qr = qry.data_ptr<int64_t>();
  at::parallel_for(0, N, GRAIN, [&](int64_t i0, int64_t i1) {
    std::vector<T> a(R * BH), dae(BH), c(BH);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t src = order ? order[i] : i;
      T* dks = dkp ? dkp + src * d * BH : nullptr;
      T* dvs = dvp ? dvp + src * dv * BH : nullptr;
      if (dks) std::fill(dks, dks + d * BH, T(0));
      if (dvs) std::fill(dvs, dvs + dv * BH, T(0));
      const T* ks = kp + src * d * BH;
      const T* vs = vp + src * dv * BH;
      int64_t m = 0;  // outgoing edges of src
      for (; m < R && rp[src * R + m] < NK; ++m) {
        const int64_t id = rp[src * R + m], n = qr[src * R + m], e = id - n * K;
        T* am = a.data() + m * BH;
        lane_dot<T, D>(qp + n * d * BH, ks, am, d, BH);
        const T be = E.b(n, e);
        const T* ln = lp + n * BH;
#pragma omp simd
        for (int64_t h = 0; h < BH; ++h) am[h] = am[h] * scale + be - ln[h];
      }
      exp_inplace(a.data(), m * BH);
      for (int64_t r = 0; r < m; ++r) {
        const int64_t id = rp[src * R + r], n = qr[src * R + r];
        const T* gn = gp + n * dv * BH;
        const T* ar = a.data() + r * BH;
        if (dvs) lane_axpy<T, DV>(ar, gn, dvs, dv, BH);
        if (dks) {
          lane_dot<T, DV>(gn, vs, dae.data(), dv, BH);
          const T gwe = gw * E.W[id];
          const T* Dn = Dp + n * BH;
#pragma omp simd
          for (int64_t h = 0; h < BH; ++h) c[h] = ar[h] * (dae[h] + gwe - Dn[h]) * scale;
          lane_axpy<T, D>(c.data(), qp + n * d * BH, dks, d, BH);
        }
      }
    }
  });
}

// One pass over reading columns that also writes dk and dv (no recomputation over the inverted edge table):
// the columns are cut into blocks of `block` consecutive columns of `order`, and the blocks are coloured so
// that two blocks of one colour never read a common source (sparse_block_colours). Colours run one after
// another (`phase_ptr` into `blocks`, the block ids sorted by colour); the blocks of one colour run in parallel,
// each adding into the dk, dv rows of its sources, which no other running block touches. Every row's sum
// therefore runs in one fixed order (colour by colour, then visiting order): no atomics, and the result does
// not depend on the thread count. Per edge: the score, dA and the dq, dk, dv products once each.
template <typename T, int D, int DV>
void backward_one_pass(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const Edges<T>& E,
                       const int64_t* order, T scale, int64_t lanes, const torch::Tensor& lse, const torch::Tensor& g,
                       T gw, const int64_t* blocks, const int64_t* phase_ptr, int64_t phases, int64_t block,
                       const Grads<T>& out) {
  const int64_t N = q.size(0), d = q.size(1), BH = q.size(2), dv = v.size(1), K = E.K;
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>(), *lp = lse.data_ptr<T>(),
          *gp = g.data_ptr<T>();
  T *dqp = out.dq, *dkp = out.dk, *dvp = out.dv, *dbp = out.dbias, *dwp = out.dW;
  for (int64_t ph = 0; ph < phases; ++ph) {
    at::parallel_for(phase_ptr[ph], phase_ptr[ph + 1], 1, [&](int64_t j0, int64_t j1) {
      std::vector<T> s(K * BH), a(K * BH), da(K * BH), c(BH), Dn(BH);
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t i1 = std::min(N, (blocks[j] + 1) * block);
        for (int64_t i = blocks[j] * block; i < i1; ++i) {
          const int64_t n = order ? order[i] : i;
          reader_backward<T, D, DV>(E, qp, kp, vp, lp, gp, n, d, dv, BH, lanes, scale, gw, s.data(), a.data(),
                                    da.data(), c.data(), Dn.data(), dqp, dkp, dvp, dbp, dwp);
        }
      }
    });
  }
}

// The one-pass backward on reader groups: per group, the scores and <g, v> against the union (each key and
// value row loaded once), the softmax gradient per reader in edge space, then dq = sum_u dS k_u for all readers
// at once and one read-modify-write of every union row's dk, dv (instead of one per edge).
template <typename T, int D, int DV>
void backward_grouped(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const Edges<T>& E,
                      const int64_t* order, T scale, int64_t lanes, const torch::Tensor& lse, const torch::Tensor& g,
                      T gw, const int64_t* blocks, const int64_t* phase_ptr, int64_t phases, int64_t block,
                      const int32_t* uni, const int32_t* ucount, const int32_t* slot, int64_t U,
                      const Grads<T>& out) {
  const int64_t N = q.size(0), d = q.size(1), P = q.size(2), dv = v.size(1), K = E.K, G = (N + RG - 1) / RG;
  constexpr int64_t W = LW<T>;
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>(), *lp = lse.data_ptr<T>(),
          *gp = g.data_ptr<T>();
  T *dqp = out.dq, *dkp = out.dk, *dvp = out.dv, *dbp = out.dbias, *dwp = out.dW;
  const int64_t per_block = block / RG;
  for (int64_t ph = 0; ph < phases; ++ph) {
    at::parallel_for(phase_ptr[ph], phase_ptr[ph + 1], 1, [&](int64_t j0, int64_t j1) {
      std::vector<T> su(RG * U * P), gu(RG * U * P), au(RG * U * P), cu(RG * U * P), a(K * P), da(K * P), c(P), Dn(P);
      std::vector<int64_t> es(K);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t gi = blocks[j] * per_block; gi < std::min(G, (blocks[j] + 1) * per_block); ++gi) {
          const int rc = static_cast<int>(std::min<int64_t>(RG, N - gi * RG));
          const int64_t uc = ucount[gi];
          const int32_t* ug = uni + gi * U;
          int64_t ns[RG];
          const T *qs[RG], *gs[RG];
          T* dqs[RG];
          for (int r = 0; r < RG; ++r) {
            const int64_t i = gi * RG + std::min(r, rc - 1);
            ns[r] = order ? order[i] : i;
            qs[r] = qp + ns[r] * d * P;
            gs[r] = gp + ns[r] * dv * P;
            dqs[r] = (dqp && r < rc) ? dqp + ns[r] * d * P : nullptr;
          }
          for (int64_t u = 0; u < uc; ++u) {
            group_dots<T, D>(qs, kp + ug[u] * d * P, su.data() + u * P, U * P, d, P);
            group_dots<T, DV>(gs, vp + ug[u] * dv * P, gu.data() + u * P, U * P, dv, P);
          }
          std::fill(au.begin(), au.begin() + RG * U * P, T(0));
          std::fill(cu.begin(), cu.begin() + RG * U * P, T(0));
          for (int r = 0; r < rc; ++r) {
            const int64_t n = ns[r];
            const int64_t m = valid_edges(E, n, es.data());
            const int32_t* sl = slot + n * K;
            const T *sr = su.data() + r * U * P, *gr = gu.data() + r * U * P, *ln = lp + n * P;
            for (int64_t jj = 0; jj < m; ++jj) {  // A = exp(s - lse), dA = <g, v> + gw W
              const int64_t e = es[jj];
              const T be = E.b(n, e), gwe = gw * E.W[n * K + e];
              for (int64_t h = 0; h < P; h += W) {
                vstore(a.data() + jj * P + h, vload(sr + sl[e] * P + h) * scale + be - vload(ln + h));
                vstore(da.data() + jj * P + h, vload(gr + sl[e] * P + h) + gwe);
              }
            }
            exp_inplace(a.data(), m * P);
            for (int64_t h = 0; h < P; h += W) {
              Vec<T> acc = {};
              for (int64_t jj = 0; jj < m; ++jj) acc += vload(a.data() + jj * P + h) * vload(da.data() + jj * P + h);
              vstore(Dn.data() + h, acc);
            }
            T *ar = au.data() + r * U * P, *cr = cu.data() + r * U * P;
            for (int64_t jj = 0; jj < m; ++jj) {  // dS = A (dA - D)
              const int64_t e = es[jj];
              const T* ae = a.data() + jj * P;
              const auto [sb, sw] = edge_ds(ae, da.data() + jj * P, Dn.data(), c.data(), P, lanes);
              if (dbp) dbp[n * K + e] = sb;
              if (dwp) dwp[n * K + e] = gw * sw;
              T *au_ = ar + sl[e] * P, *cu_ = cr + sl[e] * P;
#pragma omp simd
              for (int64_t h = 0; h < P; ++h) {
                au_[h] += ae[h];
                cu_[h] += c[h] * scale;
              }
            }
            if (E.valid != nullptr && (dbp || dwp)) {
              const bool* ok = E.valid + n * K;
              for (int64_t e = 0; e < K; ++e)
                if (!ok[e]) {
                  if (dbp) dbp[n * K + e] = 0;
                  if (dwp) dwp[n * K + e] = 0;
                }
            }
          }
          if (dqp) group_rows<T, D>(cu.data(), U * P, kp, ug, d * P, uc, d, P, dqs, false);
          if (dkp) group_scatter<T, D>(cu.data(), U * P, dkp, ug, d * P, uc, d, P, qs, rc);
          if (dvp) group_scatter<T, DV>(au.data(), U * P, dvp, ug, dv * P, uc, dv, P, gs, rc);
        }
      }
    });
  }
}

template <typename T>
Edges<T> edges(const torch::Tensor& index, const torch::Tensor& valid, const torch::Tensor& bias, const torch::Tensor& W) {
  return Edges<T>{index.data_ptr<int64_t>(), valid.numel() ? valid.data_ptr<bool>() : nullptr,
                  bias.numel() ? bias.data_ptr<T>() : nullptr, W.data_ptr<T>(), index.size(1)};
}

// The edge table every entry point reads: index (N, K) int64, valid empty or (N, K) bool, order empty or (N,).
void check_edge_table(const torch::Tensor& index, const torch::Tensor& valid, const torch::Tensor& order) {
  TORCH_CHECK(index.dim() == 2 && index.scalar_type() == torch::kInt64 && index.is_contiguous(),
              "index must be contiguous (N, K) int64");
  TORCH_CHECK(valid.numel() == 0 || (valid.sizes() == index.sizes() && valid.scalar_type() == torch::kBool && valid.is_contiguous()),
              "valid must be empty or contiguous (N, K) bool");
  TORCH_CHECK(order.numel() == 0 || (order.numel() == index.size(0) && order.scalar_type() == torch::kInt64 && order.is_contiguous()),
              "order must be empty or an (N,) int64 permutation");
}

void check(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& index,
           const torch::Tensor& valid, const torch::Tensor& bias, const torch::Tensor& W, const torch::Tensor& order,
           int64_t lanes) {
  TORCH_CHECK(q.device().is_cpu(), "fused sparse attention runs on CPU tensors");
  const int64_t blocks = q.dim() == 3 ? q.size(2) / (32 / q.element_size()) : 0;
  TORCH_CHECK(q.dim() == 3 && lanes >= 1 && lanes <= q.size(2) && q.size(2) % (32 / q.element_size()) == 0 &&
                  (blocks & (blocks - 1)) == 0,
              "q must hold `lanes` lanes padded to a power-of-two number of vectors");
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.dim() == 3 && v.size(0) == q.size(0) && v.size(2) == q.size(2),
              "q, k must be (N, d, BH) and v (N, dv, BH)");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "q, k, v must be contiguous");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() && W.scalar_type() == q.scalar_type(),
              "q, k, v and W must share one dtype");
  check_edge_table(index, valid, order);
  TORCH_CHECK(index.size(0) == q.size(0), "index must have one row per column of q");
  TORCH_CHECK(W.sizes() == index.sizes() && W.is_contiguous(), "W must be contiguous (N, K)");
  TORCH_CHECK(bias.numel() == 0 || (bias.sizes() == index.sizes() && bias.scalar_type() == q.scalar_type() && bias.is_contiguous()),
              "bias must be empty or contiguous (N, K) in q's dtype");
}

}  // namespace

// Head dimensions known at compile time for the common sizes (the dot products and axpys unroll into a
// few vector instructions); any other size takes the generic loops.
#define DIMS_CASE(DQ, DVV, ...)                   \
  if (d_ == DQ && dv_ == DVV) {                  \
    constexpr int D_ = DQ, DV_ = DVV;            \
    __VA_ARGS__;                                 \
    return;                                      \
  }
#define DISPATCH_DIMS(DQ_RT, DV_RT, ...)                                                \
  [&] {                                                                                \
    const int64_t d_ = DQ_RT, dv_ = DV_RT;                                             \
    DIMS_CASE(8, 8, __VA_ARGS__) DIMS_CASE(8, 16, __VA_ARGS__) DIMS_CASE(16, 16, __VA_ARGS__)            \
    DIMS_CASE(16, 32, __VA_ARGS__) DIMS_CASE(32, 32, __VA_ARGS__) DIMS_CASE(32, 64, __VA_ARGS__)            \
    DIMS_CASE(64, 64, __VA_ARGS__) {                                                      \
      constexpr int D_ = 0, DV_ = 0;                                                   \
      __VA_ARGS__;                                                                     \
    }                                                                                  \
  }()

// Reader groups of RG consecutive columns of `order`: (uni (G, U) int32: the sorted distinct sources of each
// group's valid edges, padded with 0; ucount (G,) int32: how many; slot (N, K) int32: each valid edge's position in
// its group's union, 0 on invalid edges).
std::vector<torch::Tensor> sparse_reader_groups(torch::Tensor index, torch::Tensor valid, torch::Tensor order) {
  check_edge_table(index, valid, order);
  const int64_t N = index.size(0), K = index.size(1), G = (N + RG - 1) / RG;
  TORCH_CHECK(N < (int64_t(1) << 31), "reader groups need fewer than 2^31 columns");
  const int64_t *ip = index.data_ptr<int64_t>(), *op = order.numel() ? order.data_ptr<int64_t>() : nullptr;
  const bool* vp = valid.numel() ? valid.data_ptr<bool>() : nullptr;
  std::vector<std::vector<int32_t>> lists(G);
  at::parallel_for(0, G, 256, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      auto& l = lists[g];
      for (int64_t i = g * RG; i < std::min(N, (g + 1) * RG); ++i) {
        const int64_t n = op ? op[i] : i;
        for (int64_t e = 0; e < K; ++e)
          if (vp == nullptr || vp[n * K + e]) l.push_back(static_cast<int32_t>(ip[n * K + e]));
      }
      std::sort(l.begin(), l.end());
      l.erase(std::unique(l.begin(), l.end()), l.end());
    }
  });
  int64_t U = 1;
  for (const auto& l : lists) U = std::max<int64_t>(U, static_cast<int64_t>(l.size()));
  auto opts = index.options().dtype(torch::kInt32);
  auto uni = torch::zeros({G, U}, opts), ucount = torch::empty({G}, opts), slot = torch::zeros({N, K}, opts);
  int32_t *up = uni.data_ptr<int32_t>(), *cp = ucount.data_ptr<int32_t>(), *sp = slot.data_ptr<int32_t>();
  at::parallel_for(0, G, 256, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const auto& l = lists[g];
      std::copy(l.begin(), l.end(), up + g * U);
      cp[g] = static_cast<int32_t>(l.size());
      for (int64_t i = g * RG; i < std::min(N, (g + 1) * RG); ++i) {
        const int64_t n = op ? op[i] : i;
        for (int64_t e = 0; e < K; ++e)
          if (vp == nullptr || vp[n * K + e])
            sp[n * K + e] = static_cast<int32_t>(std::lower_bound(l.begin(), l.end(), static_cast<int32_t>(ip[n * K + e])) - l.begin());
      }
    }
  });
  return {uni, ucount, slot};
}

void check_groups(const torch::Tensor& uni, const torch::Tensor& ucount, const torch::Tensor& slot, const torch::Tensor& index) {
  const int64_t N = index.size(0), G = (N + RG - 1) / RG;
  TORCH_CHECK(uni.dim() == 2 && uni.size(0) == G && uni.scalar_type() == torch::kInt32 && uni.is_contiguous() &&
                  ucount.numel() == G && ucount.scalar_type() == torch::kInt32 && ucount.is_contiguous() &&
                  slot.sizes() == index.sizes() && slot.scalar_type() == torch::kInt32 && slot.is_contiguous(),
              "uni, ucount, slot must come from sparse_reader_groups for this index");
}

// returns (out (N, dv, P), lse (N, P), wiring per column (N,), entropy per column (N,), probs (N, BH, K) or empty)
std::vector<torch::Tensor> sparse_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor index,
                                   torch::Tensor valid, torch::Tensor bias, torch::Tensor W, torch::Tensor order,
                                   double scale, int64_t lanes, bool record, torch::Tensor uni, torch::Tensor ucount,
                                   torch::Tensor slot) {
  check(q, k, v, index, valid, bias, W, order, lanes);
  const bool grouped = uni.numel() > 0;
  if (grouped) check_groups(uni, ucount, slot, index);
  const int64_t N = q.size(0), K = index.size(1);
  auto out = torch::empty({N, v.size(1), q.size(2)}, q.options());
  auto lse = torch::empty({N, q.size(2)}, q.options());
  auto colw = torch::empty({N}, q.options());
  auto colh = torch::empty({N}, q.options());
  auto probs = record ? torch::empty({N, lanes, K}, q.options()) : torch::empty({0}, q.options());
  const int64_t* op = order.numel() ? order.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fused_sparse_forward", [&] {
    auto E = edges<scalar_t>(index, valid, bias, W);
    scalar_t* pp = record ? probs.data_ptr<scalar_t>() : nullptr;
    if (grouped) {
      DISPATCH_DIMS(q.size(1), v.size(1),
                    forward_grouped<scalar_t, D_, DV_>(q, k, v, E, op, static_cast<scalar_t>(scale), lanes,
                                                       uni.data_ptr<int32_t>(), ucount.data_ptr<int32_t>(),
                                                       slot.data_ptr<int32_t>(), uni.size(1), out, lse, colw, colh, pp));
      return;
    }
    DISPATCH_DIMS(q.size(1), v.size(1), forward_impl<scalar_t, D_, DV_>(q, k, v, E, op, static_cast<scalar_t>(scale), lanes,
                                                                         out, lse, colw, colh, pp));
  });
  return {out, lse, colw, colh, probs};
}

// Greedy colouring of the blocks of `block` consecutive columns of `order` (the last one may be shorter): blocks
// whose columns read a common source get different colours; blocks are coloured in order, each taking the lowest
// colour none of its sources has been read under. Returns (nblocks,) int64 colours, or an empty tensor when more
// than 64 colours would be needed (e.g. many long-range edges): then the backward pass takes two passes.
torch::Tensor sparse_block_colours(torch::Tensor index, torch::Tensor valid, torch::Tensor order, int64_t block) {
  check_edge_table(index, valid, order);
  TORCH_CHECK(block >= 1, "block must be >= 1");
  const int64_t N = index.size(0), K = index.size(1), nblocks = (N + block - 1) / block;
  const int64_t *ip = index.data_ptr<int64_t>(), *op = order.numel() ? order.data_ptr<int64_t>() : nullptr;
  const bool* vp = valid.numel() ? valid.data_ptr<bool>() : nullptr;
  std::vector<uint64_t> used(N, 0);  // colours under which each source has been read
  auto colours = torch::empty({nblocks}, index.options());
  int64_t* cp = colours.data_ptr<int64_t>();
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t i0 = b * block, i1 = std::min(N, i0 + block);
    uint64_t taken = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = op ? op[i] : i;
      for (int64_t e = 0; e < K; ++e)
        if (vp == nullptr || vp[n * K + e]) taken |= used[ip[n * K + e]];
    }
    if (~taken == 0) return torch::empty({0}, index.options());
    const int c = __builtin_ctzll(~taken);
    cp[b] = c;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = op ? op[i] : i;
      for (int64_t e = 0; e < K; ++e)
        if (vp == nullptr || vp[n * K + e]) used[ip[n * K + e]] |= uint64_t(1) << c;
    }
  }
  return colours;
}

// returns (dq, dk, dv, dbias, dW); the ones not needed are empty. With `phase_ptr` non-empty the one-pass
// backward runs (blocks, phase_ptr, block from sparse_block_colours), else two passes (rev, qry).
std::vector<torch::Tensor> sparse_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor index,
                                    torch::Tensor valid, torch::Tensor bias, torch::Tensor W, torch::Tensor order,
                                    double scale, int64_t lanes, torch::Tensor lse, torch::Tensor g, double gw,
                                    torch::Tensor rev, torch::Tensor qry, torch::Tensor blocks, torch::Tensor phase_ptr,
                                    int64_t block, torch::Tensor uni, torch::Tensor ucount, torch::Tensor slot,
                                    bool need_q, bool need_k, bool need_v, bool need_bias, bool need_w) {
  check(q, k, v, index, valid, bias, W, order, lanes);
  TORCH_CHECK(g.sizes() == v.sizes() && g.is_contiguous() && g.scalar_type() == q.scalar_type(), "g must be like v");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q.size(0) && lse.size(1) == q.size(2) && lse.is_contiguous(), "lse must be (N, BH)");
  const bool one_pass = phase_ptr.numel() > 0, grouped = one_pass && uni.numel() > 0;
  if (grouped) {
    check_groups(uni, ucount, slot, index);
    TORCH_CHECK(block % RG == 0, "the one-pass blocks must hold whole reader groups");
  }
  TORCH_CHECK(!one_pass || (phase_ptr.scalar_type() == torch::kInt64 && blocks.scalar_type() == torch::kInt64 &&
                            blocks.is_contiguous() && phase_ptr.is_contiguous() && block >= 1 &&
                            blocks.numel() == (q.size(0) + block - 1) / block &&
                            phase_ptr[-1].item<int64_t>() == blocks.numel()),
              "blocks, phase_ptr must come from sparse_block_colours with this block size");
  TORCH_CHECK(one_pass || !(need_k || need_v) || (rev.dim() == 2 && rev.size(0) == q.size(0) && qry.sizes() == rev.sizes() &&
                                      rev.is_contiguous() && qry.is_contiguous()), "rev, qry must be (N, R)");
  const int64_t N = q.size(0), K = index.size(1);
  auto none = torch::empty({0}, q.options());
  auto dq = need_q ? torch::empty_like(q) : none;
  auto dk = need_k ? (one_pass ? torch::zeros_like(k) : torch::empty_like(k)) : none;
  auto dvv = need_v ? (one_pass ? torch::zeros_like(v) : torch::empty_like(v)) : none;
  auto dbias = need_bias ? torch::empty({N, K}, q.options()) : none;
  auto dW = need_w ? torch::empty({N, K}, q.options()) : none;
  const int64_t* op = order.numel() ? order.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fused_sparse_backward", [&] {
    auto E = edges<scalar_t>(index, valid, bias, W);
    const Grads<scalar_t> out(dq, dk, dvv, dbias, dW);
    if (grouped) {
      DISPATCH_DIMS(q.size(1), v.size(1),
                    backward_grouped<scalar_t, D_, DV_>(q, k, v, E, op, static_cast<scalar_t>(scale), lanes, lse, g,
                                                        static_cast<scalar_t>(gw), blocks.data_ptr<int64_t>(),
                                                        phase_ptr.data_ptr<int64_t>(), phase_ptr.numel() - 1, block,
                                                        uni.data_ptr<int32_t>(), ucount.data_ptr<int32_t>(),
                                                        slot.data_ptr<int32_t>(), uni.size(1), out));
      return;
    }
    if (one_pass) {
      DISPATCH_DIMS(q.size(1), v.size(1),
                    backward_one_pass<scalar_t, D_, DV_>(q, k, v, E, op, static_cast<scalar_t>(scale), lanes, lse, g,
                                                         static_cast<scalar_t>(gw), blocks.data_ptr<int64_t>(),
                                                         phase_ptr.data_ptr<int64_t>(), phase_ptr.numel() - 1, block,
                                                         out));
      return;
    }
    DISPATCH_DIMS(q.size(1), v.size(1),
                  backward_impl<scalar_t, D_, DV_>(q, k, v, E, op, static_cast<scalar_t>(scale), lanes, lse, g,
                                                   static_cast<scalar_t>(gw), rev, qry, out));
  });
  return {dq, dk, dvv, dbias, dW};
}
