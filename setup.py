"""Builds csrc/ (pybind11, OpenMP) as ``hotloop.kernels._row_kernels``; see csrc/README.md."""
from setuptools import setup

setup()
