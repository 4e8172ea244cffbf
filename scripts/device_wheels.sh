#!/usr/bin/env bash
# Download the wheels the GPU device image lacks into .device-wheels/ (git-ignored), for `run(carry=[...])`.
#
# The image (docs/gpu.md) has Python 3.12, torch 2.11, triton 3.6, transformers 5.17, accelerate, pybind11, sympy,
# pyyaml, matplotlib, no network. bench.gpu imports, beyond it: liger-kernel and cut-cross-entropy (peers), trl
# (its chunked log-prob peer; imports nothing the image lacks), math-verify (hotloop's reward parsing) with its
# latex2sympy2_extended and antlr4 runtime. All are pure-Python wheels, fetched with --no-deps so pip never pulls
# another torch or triton. The device command installs them with `pip install --no-index --no-deps`.
#
# usage: scripts/device_wheels.sh [folder]   (default .device-wheels; needs the package index)
set -euo pipefail
dest="${1:-.device-wheels}"
limit_mib=48  # the carry limit is 64 MiB for the working tree and the wheels together
pins=(
  "liger-kernel==0.8.5"
  "cut-cross-entropy==25.1.1"
  "trl==1.16.0"
  "math-verify==0.9.0"
  "latex2sympy2_extended==1.11.0"
  "antlr4-python3-runtime==4.13.2"
)
mkdir -p "$dest"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d "$dest" "${pins[@]}"
size_kib=$(du -sk "$dest" | cut -f1)
ls -l "$dest"
echo "total: $((size_kib / 1024)) MiB in $dest"
if (( size_kib > limit_mib * 1024 )); then
  echo "error: $dest is over ${limit_mib} MiB; the device tool carries at most 64 MiB with the tree" >&2
  exit 1
fi
