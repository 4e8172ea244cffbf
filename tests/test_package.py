"""The package imports under its mapped names and exposes its version."""

import importlib

import pytest


@pytest.mark.parametrize("name", ["hotloop", "hotloop.kernels", "hotloop.runtime", "hotloop.algorithms"])
def test_subpackages_import_under_hotloop_namespace(name):
    module = importlib.import_module(name)
    assert module.__name__ == name


def test_backend_env_var_rejects_unknown_value(monkeypatch):
    from hotloop.kernels import _dispatch

    monkeypatch.setenv("HOTLOOP_BACKEND", "cuda")
    with pytest.raises(ValueError, match="HOTLOOP_BACKEND"):
        _dispatch.requested_backend()
