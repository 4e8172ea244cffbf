// pybind11 bindings for the CPU row kernels (no PyTorch headers: tensors arrive as data_ptr()
// integers). Shapes, dtypes and contiguity are checked by kernels/_cpu_ext.py, the only caller.
// Both functions release the GIL while the OpenMP loops run.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "row_kernels.h"

namespace py = pybind11;

namespace {

hotloop::DType to_dtype(int flag) {
  if (flag != 0 && flag != 1) {
    throw std::invalid_argument("dtype flag must be 0 (float32) or 1 (bfloat16), got " +
                                std::to_string(flag));
  }
  return static_cast<hotloop::DType>(flag);
}

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void row_stats_fold(uintptr_t logits, uintptr_t targets, uintptr_t m, uintptr_t s, uintptr_t t,
                    uintptr_t target_logit, int64_t rows, int64_t block, int64_t row_stride,
                    int64_t vocab_start, int dtype, float inv_temperature, int num_threads) {
  hotloop::RowFoldParams p{ptr<const void>(logits), ptr<const int64_t>(targets), ptr<double>(m),
                           ptr<double>(s), ptr<double>(t), ptr<double>(target_logit), rows, block,
                           row_stride, vocab_start, to_dtype(dtype), inv_temperature, num_threads};
  py::gil_scoped_release release;
  hotloop::row_stats_fold_cpu(p);
}

void row_grad(uintptr_t logits, uintptr_t targets, uintptr_t lse, uintptr_t lse_lo, uintptr_t entropy,
              uintptr_t grad_logp, uintptr_t grad_entropy, int64_t rows, int64_t block, int64_t row_stride,
              int64_t vocab_start, int dtype, float inv_temperature, int64_t ignore_index,
              int num_threads, uintptr_t out, int64_t out_row_stride) {
  if (out != 0 && to_dtype(dtype) != hotloop::DType::kFloat32) {
    throw std::invalid_argument("row_grad: out needs float32 logits (it receives their bf16 gradient)");
  }
  hotloop::RowGradParams p{ptr<void>(logits), ptr<const int64_t>(targets), ptr<const float>(lse),
                           ptr<const float>(lse_lo), ptr<const float>(entropy), ptr<const float>(grad_logp),
                           ptr<const float>(grad_entropy), rows, block, row_stride, vocab_start,
                           to_dtype(dtype), inv_temperature, ignore_index, num_threads, ptr<void>(out),
                           out_row_stride};
  py::gil_scoped_release release;
  hotloop::row_grad_cpu(p);
}

}  // namespace

PYBIND11_MODULE(_row_kernels, m) {
  m.doc() = "hotloop native row kernels (CPU, OpenMP): row_stats_fold and in-place row_grad.";
  m.def("row_stats_fold", &row_stats_fold,
        "Folds logits [R, Vb] (columns vocab_start.. of the rows) into running fp64 (m, s, t, "
        "target_logit) [R]; pointers are tensor.data_ptr() values; dtype 0 = float32, 1 = bfloat16.",
        py::arg("logits"), py::arg("targets"), py::arg("m"), py::arg("s"), py::arg("t"),
        py::arg("target_logit"), py::arg("rows"), py::arg("block"), py::arg("row_stride"),
        py::arg("vocab_start"), py::arg("dtype"), py::arg("inv_temperature"), py::arg("num_threads"));
  m.def("row_grad", &row_grad,
        "Overwrites logits [R, Vb] (columns vocab_start.. of the row) with d(g_lp logp + g_ent H)/dx; "
        "lse_lo (the remainder of an fp64 lse) may be 0 (null); entropy and grad_entropy may be 0 (null) to "
        "skip the entropy term; out != 0: float32 logits stay, their bf16 gradient goes to out [R, Vb] "
        "(rows out_row_stride apart).",
        py::arg("logits"), py::arg("targets"), py::arg("lse"), py::arg("lse_lo"), py::arg("entropy"),
        py::arg("grad_logp"),
        py::arg("grad_entropy"), py::arg("rows"), py::arg("block"), py::arg("row_stride"),
        py::arg("vocab_start"), py::arg("dtype"), py::arg("inv_temperature"), py::arg("ignore_index"),
        py::arg("num_threads"), py::arg("out") = 0, py::arg("out_row_stride") = 0);
}
