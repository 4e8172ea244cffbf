// CUDA row kernels with the math of row_kernels_cpu.cpp (see row_kernels.h): one thread block
// per row, each thread keeps an online (max m, S = sum e^{z-m}, T = sum e^{z-m} (z-m)) over a
// strided slice of the row, and the triples merge through warp shuffles, then shared memory.
//   lse = m + log S,   H = log S - T / S,   logp = z_t - lse.
// row_grad overwrites a [R, Vb] block in place (one read + one write per logit). fp32 and bf16
// (raw uint16 bits) logits; all arithmetic is fp32. Memory: reads R*V logits (+ writes R*Vb).
// These kernels are for GPU users; the Python package runs Triton on CUDA tensors, and CI only
// checks that this file compiles (nvcc -c).
#include <cuda_runtime.h>

#include <cstdint>

#include "row_kernels.h"

namespace hotloop {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float load(const float* p, int64_t j) { return p[j]; }
__device__ __forceinline__ float load(const uint16_t* p, int64_t j) {
  return __uint_as_float(uint32_t(p[j]) << 16);
}
__device__ __forceinline__ void store(float* p, int64_t j, float v) { p[j] = v; }
__device__ __forceinline__ void store(uint16_t* p, int64_t j, float v) {
  const uint32_t b = __float_as_uint(v);  // round to nearest even; NaN stays NaN
  p[j] = uint16_t(v != v ? ((b >> 16) | 0x40u) : (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

struct Triple {
  float m, s, t;
};

// Merge two online states; a state with s == 0 (nothing seen, m = -inf) contributes nothing.
__device__ __forceinline__ Triple merge(Triple a, Triple b) {
  if (a.s == 0.0f) return b;
  if (b.s == 0.0f) return a;
  const float m = fmaxf(a.m, b.m);
  const float da = a.m - m, db = b.m - m;
  const float ea = expf(da), eb = expf(db);
  return {m, a.s * ea + b.s * eb, ea * (a.t + da * a.s) + eb * (b.t + db * b.s)};
}

__device__ __forceinline__ Triple block_reduce(Triple v) {
  __shared__ Triple partial[kWarps];
  for (int off = 16; off > 0; off >>= 1) {
    Triple o{__shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.s, off),
             __shfl_xor_sync(0xffffffffu, v.t, off)};
    v = merge(v, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? partial[lane] : Triple{-INFINITY, 0.0f, 0.0f};
    for (int off = 16; off > 0; off >>= 1) {
      Triple o{__shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.s, off),
               __shfl_xor_sync(0xffffffffu, v.t, off)};
      v = merge(v, o);
    }
  }
  return v;  // valid in thread 0
}

template <typename T>
__global__ void __launch_bounds__(kThreads) row_stats_kernel(RowStatsParams p) {
  const int64_t r = blockIdx.x;
  const T* x = static_cast<const T*>(p.logits) + r * p.row_stride;
  const float s = p.inv_temperature;
  Triple acc{-INFINITY, 0.0f, 0.0f};
  for (int64_t j = threadIdx.x; j < p.vocab; j += kThreads) {
    const float z = s * load(x, j);
    if (z == -INFINITY) continue;  // adds nothing; would make z - m NaN while m = -inf
    if (z > acc.m) {  // new max: S' = S e^{m - z}, T' = e^{m - z} (T + (m - z) S)
      const float d = acc.m - z;
      const float e = acc.s > 0.0f ? expf(d) : 0.0f;
      acc.t = acc.s > 0.0f ? e * (acc.t + d * acc.s) : 0.0f;
      acc.s *= e;
      acc.m = z;
    }
    const float d = z - acc.m;
    const float e = expf(d);
    acc.s += e;
    acc.t += e > 0.0f ? e * d : 0.0f;
  }
  acc = block_reduce(acc);
  if (threadIdx.x != 0) return;
  const float log_s = logf(acc.s);
  const float lse = acc.m + log_s;
  const int64_t t = p.targets[r];
  const bool ignored = t == p.ignore_index;
  const bool bad = !ignored && (t < 0 || t >= p.vocab);
  p.lse[r] = lse;
  p.logp[r] = ignored ? 0.0f : (bad ? NAN : s * load(x, t) - lse);
  p.entropy[r] = ignored ? 0.0f : (bad ? NAN : log_s - acc.t / acc.s);
}

// g_j = s * [g_lp (1[j = t] - p_j) - g_ent p_j (log p_j + H)]
template <typename T>
__global__ void __launch_bounds__(kThreads) row_grad_kernel(RowGradParams p) {
  const int64_t r = blockIdx.x;
  T* x = static_cast<T*>(p.logits) + r * p.row_stride;
  const int64_t t = p.targets[r];
  if (t == p.ignore_index) {
    for (int64_t j = threadIdx.x; j < p.block; j += kThreads) store(x, j, 0.0f);
    return;
  }
  const float s = p.inv_temperature, lse = p.lse[r], g_lp = p.grad_logp[r];
  const float lse_lo = p.lse_lo != nullptr ? p.lse_lo[r] : 0.0f;
  const float g_ent = p.grad_entropy != nullptr ? p.grad_entropy[r] : 0.0f;
  const float h = p.grad_entropy != nullptr ? p.entropy[r] : 0.0f;
  const int64_t local_t = t - p.vocab_start;
  for (int64_t j = threadIdx.x; j < p.block; j += kThreads) {
    const float lp = (s * load(x, j) - lse) - lse_lo;
    const float pj = expf(lp);
    const float one_hot = j == local_t ? g_lp : 0.0f;
    const float ent = pj > 0.0f ? g_ent * pj * (lp + h) : 0.0f;
    store(x, j, s * (one_hot - g_lp * pj - ent));
  }
}

}  // namespace

int row_stats_cuda(const RowStatsParams& p, void* stream) {
  if (p.rows == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  if (p.dtype == DType::kFloat32) {
    row_stats_kernel<float><<<unsigned(p.rows), kThreads, 0, st>>>(p);
  } else {
    row_stats_kernel<uint16_t><<<unsigned(p.rows), kThreads, 0, st>>>(p);
  }
  return int(cudaGetLastError());
}

int row_grad_cuda(const RowGradParams& p, void* stream) {
  if (p.rows == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  if (p.dtype == DType::kFloat32) {
    row_grad_kernel<float><<<unsigned(p.rows), kThreads, 0, st>>>(p);
  } else {
    row_grad_kernel<uint16_t><<<unsigned(p.rows), kThreads, 0, st>>>(p);
  }
  return int(cudaGetLastError());
}

}  // namespace hotloop
