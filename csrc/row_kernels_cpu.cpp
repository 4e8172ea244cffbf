// CPU row kernels: OpenMP across rows, `omp simd` inside a row. See row_kernels.h for the math.
//
// row_stats_fold folds a block of columns into per-row running statistics (fp64 m = max z,
// S = sum e^{z-m}, T = sum e^{z-m} (z-m), and the target logit z_t when the target lies in the
// block), so the caller may sweep a row in one block or in many (vocabulary blocks whose logits
// are still in cache). Each block row is swept in chunks of kChunk logits (8 KiB of fp32) that
// are read twice, once for their max and once for exp / e * d, while they sit in L1; when a
// chunk raises the max the totals are rescaled. Chunk partial sums are fp32 (vector lanes), the
// running totals fp64. Afterwards lse = m + log S, H = log S - T / S, logp = z_t - lse.
// row_grad overwrites the block in one read + one write per logit.
//
#include "row_kernels.h"

#include <cmath>
#include <cstring>
#include <limits>

#include <omp.h>

#include "target_clones.h"

#define HOTLOOP_INLINE inline __attribute__((always_inline))

namespace hotloop {
namespace {

// Logits per chunk: 8 KiB of fp32 stays in L1 between the max sweep and the exp sweep.
// -DHOTLOOP_ROW_CHUNK=<n> overrides it (a huge value gives the plain two-pass-over-the-row variant).
#ifndef HOTLOOP_ROW_CHUNK
#define HOTLOOP_ROW_CHUNK 2048
#endif
constexpr int64_t kChunk = HOTLOOP_ROW_CHUNK;
constexpr float kInf = std::numeric_limits<float>::infinity();

HOTLOOP_INLINE float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

HOTLOOP_INLINE uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

HOTLOOP_INLINE float load(const float* p, int64_t j) { return p[j]; }
HOTLOOP_INLINE float load(const uint16_t* p, int64_t j) { return bits_to_float(uint32_t(p[j]) << 16); }

HOTLOOP_INLINE void store(float* p, int64_t j, float v) { p[j] = v; }
// Round to nearest even; NaN stays a (quiet) NaN instead of rounding into inf.
HOTLOOP_INLINE void store(uint16_t* p, int64_t j, float v) {
  const uint32_t b = float_to_bits(v);
  const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  p[j] = uint16_t(v != v ? ((b >> 16) | 0x40u) : rounded);
}

// Cephes expf for x <= ~0 (every caller passes z - max or z - lse): exp(x) = 2^n * exp(r),
// n = round(x / ln 2), |r| <= ln 2 / 2, degree-6 polynomial (max rel. error ~1.5e-7 in fp32).
// Below -87.3 the result is 0 (also for -inf); NaN stays NaN. No upper clamp: x stays far below
// the fp32 overflow at 88.7, which saves two compares and two blends per vector.
HOTLOOP_INLINE float exp_nonpositive(float x) {
  constexpr float kLo = -87.3365447504f;
  const float xc = x < kLo ? kLo : x;
  // (v + 1.5 * 2^23) - 1.5 * 2^23 rounds v to the nearest integer without libm, so it vectorizes.
  constexpr float kRound = 12582912.0f;
  const float n = (xc * 1.44269504088896341f + kRound) - kRound;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const float scale = bits_to_float(uint32_t(int32_t(n) + 127) << 23);
  return x < kLo ? 0.0f : y * scale;
}

struct Running {
  double m;  // running max of z (-inf before any column)
  double s;  // sum e^{z - m}
  double t;  // sum e^{z - m} (z - m)
};

// Folds one chunk of z = inv_t * x into the running statistics (T only when kWithT: entropy wanted).
template <bool kWithT, typename T>
HOTLOOP_INLINE void fold_chunk(const T* __restrict x, int64_t n, float inv_t, Running& acc) {
  float cm = -kInf;
#pragma omp simd reduction(max : cm)
  for (int64_t j = 0; j < n; ++j) {
    const float z = inv_t * load(x, j);
    cm = z > cm ? z : cm;
  }
  if (double(cm) > acc.m) {
    // New max: S' = S e^{m - m'},  T' = e^{m - m'} (T + (m - m') S).
    if (acc.s > 0.0) {
      const double shift = acc.m - double(cm);
      const double scale = std::exp(shift);
      acc.t = scale * (acc.t + shift * acc.s);
      acc.s = scale * acc.s;
    }
    acc.m = double(cm);
  }
  const float m = float(acc.m);
  if (!(m > -kInf)) return;  // chunk of -inf (or NaN) logits adds nothing
  float cs = 0.0f, ct = 0.0f;
  if (kWithT) {
#pragma omp simd reduction(+ : cs, ct)
    for (int64_t j = 0; j < n; ++j) {
      const float d = inv_t * load(x, j) - m;
      const float e = exp_nonpositive(d);
      cs += e;
      ct += e > 0.0f ? e * d : 0.0f;  // e = 0 at d = -inf: the limit of e * d is 0, not NaN
    }
  } else {
#pragma omp simd reduction(+ : cs)
    for (int64_t j = 0; j < n; ++j) cs += exp_nonpositive(inv_t * load(x, j) - m);
  }
  acc.s += double(cs);
  acc.t += double(ct);
}

template <bool kWithT, typename T>
HOTLOOP_INLINE void fold_row(const T* x, int64_t n, float inv_t, int64_t local_t, double* m, double* s,
                             double* t, double* zt) {
  Running acc{*m, *s, kWithT ? *t : 0.0};
  for (int64_t c = 0; c < n; c += kChunk) {
    fold_chunk<kWithT>(x + c, n - c < kChunk ? n - c : kChunk, inv_t, acc);
  }
  *m = acc.m;
  *s = acc.s;
  if (kWithT) *t = acc.t;
  if (local_t >= 0 && local_t < n) *zt = double(inv_t * load(x, local_t));
}

template <typename T>
HOTLOOP_INLINE void fold_row_of(const RowFoldParams& p, const T* x, int64_t r, int64_t local_t) {
  double* t = p.t != nullptr ? p.t + r : nullptr;
  if (t != nullptr) {
    fold_row<true>(x, p.block, p.inv_temperature, local_t, p.m + r, p.s + r, t, p.target_logit + r);
  } else {
    fold_row<false>(x, p.block, p.inv_temperature, local_t, p.m + r, p.s + r, t, p.target_logit + r);
  }
}

HOTLOOP_CLONES void fold_row_any(const RowFoldParams& p, int64_t r) {
  const int64_t local_t = p.targets[r] - p.vocab_start;  // outside [0, block): not in this block
  if (p.dtype == DType::kFloat32) {
    fold_row_of(p, static_cast<const float*>(p.logits) + r * p.row_stride, r, local_t);
  } else {
    fold_row_of(p, static_cast<const uint16_t*>(p.logits) + r * p.row_stride, r, local_t);
  }
}

// g_j = s * [g_lp (1[j = t] - p_j) - g_ent p_j (log p_j + H)] over one block row: y = x (in place) or another row.
template <typename T, typename U>
HOTLOOP_INLINE void grad_row(const T* x, U* y, int64_t n, int64_t local_t, float inv_t, float lse, float lse_lo,
                             float h, float g_lp, float g_ent) {
  const bool has_t = local_t >= 0 && local_t < n;
  const float lp_t = has_t ? (inv_t * load(x, local_t) - lse) - lse_lo : 0.0f;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float lp = (inv_t * load(x, j) - lse) - lse_lo;
    const float pj = exp_nonpositive(lp);
    const float g = pj > 0.0f ? -inv_t * pj * (g_lp + g_ent * (lp + h)) : 0.0f;
    store(y, j, g);
  }
  if (has_t) {
    const float pt = exp_nonpositive(lp_t);
    const float ent = pt > 0.0f ? g_ent * pt * (lp_t + h) : 0.0f;
    store(y, local_t, inv_t * (g_lp * (1.0f - pt) - ent));
  }
}

template <typename T>
HOTLOOP_INLINE void zero_row(T* x, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] = T(0);
}

template <typename T, typename U>
HOTLOOP_INLINE void grad_row_to(const RowGradParams& p, const T* x, U* y, int64_t r, float h, float g_ent) {
  const int64_t t = p.targets[r];
  if (t == p.ignore_index) return zero_row(y, p.block);
  const float lse_lo = p.lse_lo != nullptr ? p.lse_lo[r] : 0.0f;
  grad_row(x, y, p.block, t - p.vocab_start, p.inv_temperature, p.lse[r], lse_lo, h, p.grad_logp[r], g_ent);
}

HOTLOOP_CLONES void grad_row_any(const RowGradParams& p, int64_t r) {
  const float h = p.grad_entropy != nullptr ? p.entropy[r] : 0.0f;
  const float g_ent = p.grad_entropy != nullptr ? p.grad_entropy[r] : 0.0f;
  if (p.out != nullptr) {  // fp32 logits -> bf16 gradient (checked by the binding)
    const float* x = static_cast<const float*>(p.logits) + r * p.row_stride;
    grad_row_to(p, x, static_cast<uint16_t*>(p.out) + r * p.out_row_stride, r, h, g_ent);
  } else if (p.dtype == DType::kFloat32) {
    float* x = static_cast<float*>(p.logits) + r * p.row_stride;
    grad_row_to(p, x, x, r, h, g_ent);
  } else {
    uint16_t* x = static_cast<uint16_t*>(p.logits) + r * p.row_stride;
    grad_row_to(p, x, x, r, h, g_ent);
  }
}

int threads_for(int requested) { return requested > 0 ? requested : omp_get_max_threads(); }

}  // namespace

void row_stats_fold_cpu(const RowFoldParams& p) {
  const int nt = threads_for(p.num_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && p.rows > 1)
  for (int64_t r = 0; r < p.rows; ++r) fold_row_any(p, r);
}

void row_grad_cpu(const RowGradParams& p) {
  const int nt = threads_for(p.num_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && p.rows > 1)
  for (int64_t r = 0; r < p.rows; ++r) grad_row_any(p, r);
}

}  // namespace hotloop
