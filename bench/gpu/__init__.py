"""bench.gpu: the one-command device check (``python -m bench.gpu OUT_DIR [--dry-run]``; docs/gpu.md).

Modules: ``_plan`` (cases and shapes, real and dry), ``_reference`` (float64 references in row chunks),
``_kernels`` (log-prob / KL Triton kernels, forced launch configurations), ``_losses`` (token-loss kernels),
``_rows_cuda`` (nvcc build and check of csrc/row_kernels_cuda.cu), ``_loop`` (online-loop steps),
``_timing`` (kernels vs the GEMM floor, peers), ``_report`` (md/json/png), ``_sections`` (the run, in order).
Nothing here imports triton at package import: ``__main__`` sets ``TRITON_INTERPRET`` first for ``--dry-run``.
"""
