// Native row kernels for hotloop: per-row log-sum-exp / log-prob / entropy, and the in-place
// gradient of (g_lp * log p_t + g_ent * H) with respect to the raw logits of a vocabulary block.
//
// Math (s = inv_temperature, z = s * x, one row of V logits, target t):
//   lse = log sum_j exp(z_j),  logp = z_t - lse,  H = lse - sum_j p_j z_j,  p_j = exp(z_j - lse)
//   d/dx_j [g_lp logp + g_ent H] = s * [g_lp (1[j = t] - p_j) - g_ent p_j (log p_j + H)]
//
// The kernels take raw pointers so the extension needs no PyTorch headers: bindings.cpp turns
// tensor.data_ptr() integers into these structs. Logits are fp32 or bf16 (raw uint16 bits);
// rows are contiguous, row_stride is in elements. Statistics are always fp32.
#pragma once

#include <cstdint>

namespace hotloop {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1 };

// row_stats_fold (CPU): folds a block of columns into per-row running fp64 statistics, in place.
// Start from m = -inf, s = t = target_logit = 0 and fold the blocks of a row in any order; then
//   lse = m + log s,  H = log s - t / s,  logp = target_logit - lse.
struct RowFoldParams {
  const void* logits;      // [R, Vb] fp32 | bf16: columns vocab_start .. vocab_start + Vb of the rows
  const int64_t* targets;  // [R] column in the full row (any value outside the block is skipped)
  double* m;               // [R] running max of z = inv_temperature * x
  double* s;               // [R] sum e^{z - m}
  double* t;               // [R] sum e^{z - m} (z - m); null: not accumulated (no entropy wanted)
  double* target_logit;    // [R] z_t, written by the block holding the target
  int64_t rows;
  int64_t block;           // Vb
  int64_t row_stride;
  int64_t vocab_start;
  DType dtype;
  float inv_temperature;
  int num_threads;         // <= 0: OpenMP default
};

// row_stats (CUDA): logits [R, V] -> lse, logp, entropy [R] (fp32) in one call per full row.
struct RowStatsParams {
  const void* logits;      // [R, V] fp32 | bf16, rows row_stride elements apart
  const int64_t* targets;  // [R]
  float* lse;              // [R]  computed for every row, ignored ones included
  float* logp;             // [R]  0 where targets[r] == ignore_index
  float* entropy;          // [R]  0 where targets[r] == ignore_index
  int64_t rows;
  int64_t vocab;
  int64_t row_stride;
  DType dtype;
  float inv_temperature;
  int64_t ignore_index;
  int num_threads;         // <= 0: OpenMP default
};

// row_grad: overwrites logits [R, Vb] (columns vocab_start .. vocab_start + Vb of the full row), or writes out.
struct RowGradParams {
  void* logits;               // [R, Vb] fp32 | bf16, in: logits, out: gradient (same dtype)
  const int64_t* targets;     // [R]
  const float* lse;           // [R]  lse = lse[r] + lse_lo[r]: the fp32 rounding of an fp64 lse ...
  const float* lse_lo;        // [R]  ... and its remainder (null: 0). log p = (z - lse) - lse_lo keeps
                              //      full fp32 accuracy when |z| ~ 1e4 (z - lse is then exact)
  const float* entropy;       // [R]  may be null when grad_entropy is null
  const float* grad_logp;     // [R]
  const float* grad_entropy;  // [R]  null: no entropy term
  int64_t rows;
  int64_t block;              // Vb
  int64_t row_stride;
  int64_t vocab_start;
  DType dtype;
  float inv_temperature;
  int64_t ignore_index;
  int num_threads;
  // CPU only: null writes the gradient over the logits; else into out ([R, Vb] bf16, rows out_row_stride apart)
  // from fp32 logits, which stay as they are (one pass instead of an in-place pass and a bf16 copy).
  void* out = nullptr;
  int64_t out_row_stride = 0;
};

// CPU (row_kernels_cpu.cpp). Targets are range-checked by the Python caller.
void row_stats_fold_cpu(const RowFoldParams& p);
void row_grad_cpu(const RowGradParams& p);

// CUDA (row_kernels_cuda.cu, built by nvcc only; not part of the CPU extension). Pointers are
// device pointers, `stream` is a cudaStream_t (nullptr: default stream); num_threads is unused.
// Returns the cudaError_t of the launch as an int (0 = success). An out-of-range target gives
// NaN statistics for that row.
int row_stats_cuda(const RowStatsParams& p, void* stream);
int row_grad_cuda(const RowGradParams& p, void* stream);

}  // namespace hotloop
