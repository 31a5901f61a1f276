// AdamW steps with reduced-precision moments for the CPU (columnformer/optim.py): one pass per parameter that reads
// the stored moments, updates them and the weights in float32 and writes them back, block by block in cache. The
// Python path of optim.py does the same in chunks of whole-tensor torch ops (~15 memory passes and float32
// temporaries per step); here each value is read and written once.
//
//   adamw_8bit_step:  p (float32, n), g (float32, n); first moment as e4m3 codes m_codes (uint8, blocks * 256) with
//   one scale per block (m_scales), the second moment's root as logarithmic codes r_codes with the block's largest
//   root as scale (r_scales). Decoding goes through the tables optim.py passes (m_table: the 256 e4m3 values,
//   r_table: the 256 root values), encoding the root through its 254 rounding thresholds (r_bounds), so both paths
//   use the same codes; the first moment is rounded to nearest even e4m3fn, as torch's .to(torch.float8_e4m3fn).
//   Blocks are independent, so results do not depend on the thread count.
//
//   adamw_bf16_step:  p, g (float32, n); both moments in bf16 (m, v), written back with stochastic rounding: random
//   bits added below bf16's mantissa, then truncated, so each stored value is unbiased. The bits come from a
//   counter-based hash of (seed, element), seed chosen per (run seed, step, parameter) by optim.py: a resumed run
//   and every DDP replica draw the same noise, whatever the thread count. ``offset``: p is the parameter's elements
//   from ``offset`` on (a step in parts, optim.step_part), which then draw the noise of the whole step.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

constexpr int64_t BLOCK = 256;  // optim.BLOCK
constexpr float FP8_MAX = 448.0f;

void check(const char* fn, const torch::Tensor& t, c10::ScalarType dtype, int64_t numel, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous() && t.numel() == numel,
              fn, ": ", name, " must be a contiguous CPU tensor of ", numel, " ", c10::toString(dtype),
              " values; got ", t.numel(), " ", c10::toString(t.scalar_type()), t.is_contiguous() ? "" : " (strided)");
}

// e4m3fn bits of y in [-448, 448], rounded to nearest even (as c10::Float8_e4m3fn(y), branch-free so the loop
// vectorises): normal values keep 3 of float32's 23 mantissa bits (the carry of rounding may raise the exponent),
// values below 2^-6 become multiples of 2^-9.
inline uint8_t e4m3_code(float y) {
  uint32_t bits;
  std::memcpy(&bits, &y, sizeof bits);
  const uint32_t sign = (bits >> 24) & 0x80u;
  uint32_t u = bits & 0x7fffffffu;
  float a;
  std::memcpy(&a, &u, sizeof a);
  u += 0x7ffffu + ((u >> 20) & 1u);  // round the 20 dropped bits to nearest even
  const uint32_t normal = (u >> 20) - (120u << 3);  // rebias the exponent: 127 -> 7
  const float rounded = (a * 512.0f + 12582912.0f) - 12582912.0f;  // nearest even integer (1.5 * 2^23 trick), 0..8
  const uint32_t sub = static_cast<uint32_t>(rounded);  // multiples of 2^-9
  return static_cast<uint8_t>(sign | (a < 0.015625f ? sub : normal));
}

// The root code of z = root / (block's largest root) in [0, 1]: 0 for 0, else 255 + 16 e + j clamped to [1, 255],
// where z = 2^e f with f in [1, 2) and j counts the midpoints 2^((i + 0.5) / 16), i < 16, that f reaches -- the
// nearest code in the logarithm, equal to counting optim.ROOT_BOUNDS (2^e times these midpoints, exact in float32).
inline uint8_t root_code(float z, const float* mid) {
  uint32_t bits;
  std::memcpy(&bits, &z, sizeof bits);
  const int e = static_cast<int>((bits >> 23) & 0xff) - 127;
  const uint32_t fbits = (bits & 0x7fffffu) | 0x3f800000u;
  float f;
  std::memcpy(&f, &fbits, sizeof f);
  int j = 0;
  for (int i = 0; i < 16; ++i) j += f >= mid[i];
  const int code = std::min(255, std::max(1, 255 + 16 * e + j));
  return static_cast<uint8_t>(z > 0.0f ? code : 0);
}

// splitmix64's finaliser: 64 well-mixed bits from a counter
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// float -> bf16 bits, rounded up in magnitude with probability (distance to the value below) / ulp
inline uint16_t bf16_stochastic(float x, uint32_t noise16) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return static_cast<uint16_t>((bits + noise16) >> 16);
}

inline float bf16_value(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

}  // namespace

void adamw_bf16_step(torch::Tensor p, torch::Tensor g, torch::Tensor m, torch::Tensor v, double beta1, double beta2,
                     double eps, double step_size, double bc2_sqrt, double decay, int64_t seed, int64_t offset) {
  const int64_t n = p.numel();
  check("adamw_bf16_step", p, torch::kFloat, n, "p");
  check("adamw_bf16_step", g, torch::kFloat, n, "g");
  check("adamw_bf16_step", m, torch::kBFloat16, n, "m");
  check("adamw_bf16_step", v, torch::kBFloat16, n, "v");
  float* P = p.data_ptr<float>();
  const float* G = g.data_ptr<float>();
  uint16_t* M = reinterpret_cast<uint16_t*>(m.data_ptr<at::BFloat16>());
  uint16_t* V = reinterpret_cast<uint16_t*>(v.data_ptr<at::BFloat16>());
  const float w1 = 1.0f - static_cast<float>(beta1), b2 = static_cast<float>(beta2), w2 = 1.0f - b2;
  const float feps = static_cast<float>(eps), fstep = static_cast<float>(step_size);
  const float fbc2 = static_cast<float>(bc2_sqrt), fdecay = static_cast<float>(decay);
  const uint64_t key = mix64(static_cast<uint64_t>(seed));
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    float* __restrict pk = P;
    const float* __restrict gk = G;
    uint16_t* __restrict mk = M;
    uint16_t* __restrict vk = V;
    _Pragma("omp simd")
    for (int64_t i = i0; i < i1; ++i) {
      const float gi = gk[i];
      float mi = bf16_value(mk[i]);
      mi = mi + w1 * (gi - mi);  // lerp towards g (torch's lerp for weight < 0.5)
      const float vi = bf16_value(vk[i]) * b2 + w2 * (gi * gi);
      const float denom = std::sqrt(vi) / fbc2 + feps;
      pk[i] = pk[i] * fdecay - fstep * (mi / denom);
      const uint64_t noise = mix64(key + static_cast<uint64_t>(offset + i) * 0x9e3779b97f4a7c15ull);
      mk[i] = bf16_stochastic(mi, static_cast<uint32_t>(noise & 0xffffu));
      vk[i] = bf16_stochastic(vi, static_cast<uint32_t>((noise >> 16) & 0xffffu));
    }
  });
}

void adamw_8bit_step(torch::Tensor p, torch::Tensor g, torch::Tensor m_codes, torch::Tensor m_scales,
                     torch::Tensor r_codes, torch::Tensor r_scales, torch::Tensor m_table, torch::Tensor r_table,
                     torch::Tensor r_bounds, double beta1, double beta2, double eps, double step_size, double bc2_sqrt,
                     double decay) {
  const int64_t n = p.numel();
  const int64_t blocks = (n + BLOCK - 1) / BLOCK;
  check("adamw_8bit_step", p, torch::kFloat, n, "p");
  check("adamw_8bit_step", g, torch::kFloat, n, "g");
  check("adamw_8bit_step", m_codes, torch::kByte, blocks * BLOCK, "m_codes");
  check("adamw_8bit_step", r_codes, torch::kByte, blocks * BLOCK, "r_codes");
  check("adamw_8bit_step", m_scales, torch::kFloat, blocks, "m_scales");
  check("adamw_8bit_step", r_scales, torch::kFloat, blocks, "r_scales");
  check("adamw_8bit_step", m_table, torch::kFloat, 256, "m_table");
  check("adamw_8bit_step", r_table, torch::kFloat, 256, "r_table");
  check("adamw_8bit_step", r_bounds, torch::kFloat, 254, "r_bounds");
  float* P = p.data_ptr<float>();
  const float* G = g.data_ptr<float>();
  uint8_t* MC = m_codes.data_ptr<uint8_t>();
  uint8_t* RC = r_codes.data_ptr<uint8_t>();
  float* MS = m_scales.data_ptr<float>();
  float* RS = r_scales.data_ptr<float>();
  const float* MT = m_table.data_ptr<float>();
  const float* RT = r_table.data_ptr<float>();
  const float* RB = r_bounds.data_ptr<float>();
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2), w1 = 1.0f - b1, w2 = 1.0f - b2;
  const float feps = static_cast<float>(eps), fstep = static_cast<float>(step_size);
  const float fbc2 = static_cast<float>(bc2_sqrt), fdecay = static_cast<float>(decay);
  // the 16 midpoints of one octave, read from r_bounds (its last octave: 2^((c - 254.5) / 16), c = 239..254)
  float mid[16];
  for (int i = 0; i < 16; ++i) mid[i] = RB[238 + i] * 2.0f;
  at::parallel_for(0, blocks, 64, [&](int64_t k0, int64_t k1) {
    float mids[16];  // a local copy: the vectoriser does not read arrays through the closure
    std::copy(mid, mid + 16, mids);
    alignas(64) float m[BLOCK];
    alignas(64) float r[BLOCK];
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t lo = k * BLOCK, len = std::min(BLOCK, n - lo);
      const float sm = MS[k], sr = RS[k];
      float amax_m = 0.0f, amax_r = 0.0f;
      float* __restrict pk = P + lo;
      const float* __restrict gk = G + lo;
      for (int64_t i = 0; i < len; ++i) {  // decode (table lookups), then the update vectorises
        m[i] = MT[MC[lo + i]];
        r[i] = RT[RC[lo + i]];
      }
      _Pragma("omp simd reduction(max : amax_m, amax_r)")
      for (int64_t i = 0; i < len; ++i) {
        const float gi = gk[i];
        float mi = m[i] * sm;
        mi = mi + w1 * (gi - mi);  // lerp towards g (torch's lerp for weight < 0.5)
        const float ri = r[i] * sr;
        const float root = std::sqrt(ri * ri * b2 + w2 * (gi * gi));
        const float denom = root / fbc2 + feps;
        pk[i] = pk[i] * fdecay - fstep * (mi / denom);
        m[i] = mi;
        r[i] = root;
        amax_m = std::max(amax_m, std::abs(mi));
        amax_r = std::max(amax_r, root);
      }
      for (int64_t i = len; i < BLOCK; ++i) m[i] = r[i] = 0.0f;  // the padding of the last block stays 0
      const float new_sm = amax_m > 0.0f ? amax_m / FP8_MAX : 1.0f;
      const float div_r = std::max(amax_r, std::numeric_limits<float>::min());
      MS[k] = new_sm;
      RS[k] = amax_r;
      uint8_t* mc = MC + lo;
      uint8_t* rc = RC + lo;
      _Pragma("omp simd")
      for (int64_t i = 0; i < BLOCK; ++i) mc[i] = e4m3_code(std::min(std::max(m[i] / new_sm, -FP8_MAX), FP8_MAX));
      _Pragma("omp simd")
      for (int64_t i = 0; i < BLOCK; ++i) rc[i] = root_code(r[i] / div_r, mids);
    }
  });
}
