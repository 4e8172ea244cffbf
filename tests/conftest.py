"""Shared test setup: Triton interpreter on machines without CUDA, seeds, dtype tolerances, helpers.

``TRITON_INTERPRET`` must be set before anything imports triton (``triton.jit`` reads it when a
kernel is decorated), so it is set here, at the top of the first file pytest imports.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def nan_empty():
    """``torch.empty`` returns NaN-filled memory (ints: their max), so an output a kernel never writes cannot pass."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different but reproducible seed per test (derived from its node id)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def pytest_collection_modifyitems(config, items):
    """Skip GPU / SGLang tests where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # markers, not keywords: keywords include directory names, so a checkout under a folder
        # named gpu (or sglang) would otherwise skip every test.
        if item.get_closest_marker("gpu") or item.get_closest_marker("sglang"):
            item.add_marker(skip_gpu)
