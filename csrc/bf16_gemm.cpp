// bf16 x bf16 -> fp32 logits GEMM for the CPU path: out [R, N] fp32 = hidden [R, K] bf16 @ W[n0:n0+N].T, with
// fp32 accumulation and fp32 output (no bf16 rounding of the logits).
//
// CPU PyTorch has no bf16 GEMM with an fp32 output (no aten::mm.dtype on CPU): torch.mm of bf16 operands rounds
// its output to bf16, and upcasting the operands runs the ~5x slower fp32 GEMM. PyTorch does export the oneDNN
// micro-kernel it uses for CPU flash attention, at::native::cpublas::brgemm(M, N, K, ld_a, ld_b, ld_c, add_C,
// const BFloat16* A, const BFloat16* B, float* C, is_vnni) (AMX / AVX512-BF16). kernels/_bf16_gemm_ext.py resolves its
// address in libtorch_cpu with ctypes and hands it here, so this file needs no PyTorch headers; here are the
// tiling, the threads and the VNNI packing of B that the micro-kernel needs.
//
// VNNI layout of B = W.T [K, V]: packed[k / 2][n][k % 2] = W[n][k], i.e. the [V, K/2] matrix of bf16 pairs (one
// uint32 each) transposed to [K/2, V]; column n of B starts 2n elements into each packed row, whose stride is V.
#include <pybind11/pybind11.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace {

using Brgemm = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, const uint16_t*,
                        const uint16_t*, float*, bool);
using Release = void (*)(bool);

constexpr int64_t kTileRows = 64;   // M of one micro-kernel call
constexpr int64_t kTileCols = 256;  // N of one call: B's [K, 256] slice (256 KiB at K = 512) stays in L2
constexpr int64_t kPackBlock = 64;  // square blocks of the pair transpose

// packed [K/2, V] uint32 <- w [V, K/2] uint32 (row stride ld_w), by 64 x 64 blocks.
void vnni_pack(uintptr_t w_addr, int64_t v, int64_t pairs, int64_t ld_w, uintptr_t out_addr, int threads) {
  const auto* w = reinterpret_cast<const uint32_t*>(w_addr);
  auto* out = reinterpret_cast<uint32_t*>(out_addr);
  py::gil_scoped_release release;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (int64_t n0 = 0; n0 < v; n0 += kPackBlock) {
    for (int64_t k0 = 0; k0 < pairs; k0 += kPackBlock) {
      const int64_t n1 = std::min(v, n0 + kPackBlock), k1 = std::min(pairs, k0 + kPackBlock);
      for (int64_t k = k0; k < k1; ++k) {
        for (int64_t n = n0; n < n1; ++n) out[k * v + n] = w[n * ld_w + k];
      }
    }
  }
}

// out [R, N] (row stride ld_out) = a [R, K] (row stride ld_a) @ B[:, col0:col0+N], B packed as above (stride ld_b).
void gemm(uintptr_t brgemm_addr, uintptr_t release_addr, uintptr_t a_addr, int64_t rows, int64_t k, int64_t ld_a,
          uintptr_t b_addr, int64_t ld_b, int64_t col0, int64_t cols, uintptr_t out_addr, int64_t ld_out,
          int threads) {
  if (k % 2 != 0) throw std::invalid_argument("bf16 gemm: K must be even (VNNI pairs), got " + std::to_string(k));
  const auto brgemm = reinterpret_cast<Brgemm>(brgemm_addr);
  const auto release_tiles = reinterpret_cast<Release>(release_addr);
  const auto* a = reinterpret_cast<const uint16_t*>(a_addr);
  const auto* b = reinterpret_cast<const uint16_t*>(b_addr);
  auto* out = reinterpret_cast<float*>(out_addr);
  const int64_t col_tiles = (cols + kTileCols - 1) / kTileCols, row_tiles = (rows + kTileRows - 1) / kTileRows;
  py::gil_scoped_release release;
#pragma omp parallel num_threads(threads)
  {
    // column tiles outer: a thread keeps its slice of B in cache across every row tile
#pragma omp for collapse(2) schedule(static)
    for (int64_t j = 0; j < col_tiles; ++j) {
      for (int64_t i = 0; i < row_tiles; ++i) {
        const int64_t m0 = i * kTileRows, n0 = j * kTileCols;
        const int64_t m = std::min(kTileRows, rows - m0), n = std::min(kTileCols, cols - n0);
        brgemm(m, n, k, ld_a, ld_b, ld_out, false, a + m0 * ld_a, b + 2 * (col0 + n0), out + m0 * ld_out + n0,
               true);
      }
    }
    release_tiles(true);
  }
}

}  // namespace

PYBIND11_MODULE(_bf16_gemm, m) {
  m.doc() = "bf16 x bf16 -> fp32 GEMM through PyTorch's exported oneDNN brgemm micro-kernel (CPU, OpenMP).";
  m.def("vnni_pack", &vnni_pack, "packed [K/2, V] uint32 <- w [V, K/2] uint32 (bf16 pairs) with row stride ld_w.",
        py::arg("w"), py::arg("v"), py::arg("pairs"), py::arg("ld_w"), py::arg("out"), py::arg("threads"));
  m.def("gemm", &gemm,
        "out [R, N] fp32 = a [R, K] bf16 @ packed B [K, col0:col0+N]; brgemm/release are the addresses of "
        "at::native::cpublas::brgemm (bf16 -> fp32) and brgemm_release.",
        py::arg("brgemm"), py::arg("release"), py::arg("a"), py::arg("rows"), py::arg("k"), py::arg("ld_a"),
        py::arg("b"), py::arg("ld_b"), py::arg("col0"), py::arg("cols"), py::arg("out"), py::arg("ld_out"),
        py::arg("threads"));
}
