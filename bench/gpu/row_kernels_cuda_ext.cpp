// pybind11 bindings of the CUDA row kernels (csrc/row_kernels_cuda.cu) for bench.gpu, which builds them with
// nvcc on the device (bench/gpu/_rows_cuda.py); they are linked into no installed extension. No PyTorch headers:
// tensors arrive as data_ptr() integers and the stream as torch.cuda.current_stream().cuda_stream; shapes,
// dtypes and contiguity are checked by the Python caller. Each call returns the cudaError_t of its launch.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "row_kernels.h"

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

int row_stats(uintptr_t logits, uintptr_t targets, uintptr_t lse, uintptr_t logp, uintptr_t entropy, int64_t rows,
              int64_t vocab, int64_t row_stride, int dtype, float inv_temperature, int64_t ignore_index,
              uintptr_t stream) {
  hotloop::RowStatsParams p{ptr<const void>(logits), ptr<const int64_t>(targets), ptr<float>(lse), ptr<float>(logp),
                            ptr<float>(entropy), rows, vocab, row_stride, static_cast<hotloop::DType>(dtype),
                            inv_temperature, ignore_index, 0};
  return hotloop::row_stats_cuda(p, ptr<void>(stream));
}

int row_grad(uintptr_t logits, uintptr_t targets, uintptr_t lse, uintptr_t lse_lo, uintptr_t entropy,
             uintptr_t grad_logp, uintptr_t grad_entropy, int64_t rows, int64_t block, int64_t row_stride,
             int64_t vocab_start, int dtype, float inv_temperature, int64_t ignore_index, uintptr_t stream) {
  hotloop::RowGradParams p{ptr<void>(logits), ptr<const int64_t>(targets), ptr<const float>(lse),
                           ptr<const float>(lse_lo), ptr<const float>(entropy), ptr<const float>(grad_logp),
                           ptr<const float>(grad_entropy), rows, block, row_stride, vocab_start,
                           static_cast<hotloop::DType>(dtype), inv_temperature, ignore_index, 0};
  return hotloop::row_grad_cuda(p, ptr<void>(stream));
}

}  // namespace

PYBIND11_MODULE(_row_kernels_cuda, m) {
  m.doc() = "hotloop CUDA row kernels (bench.gpu build; raw device pointers)";
  m.def("row_stats", &row_stats);
  m.def("row_grad", &row_grad);
}
