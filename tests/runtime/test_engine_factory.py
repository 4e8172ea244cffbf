"""Engines by kind: the run config's ``engine:`` section, ``--set engine.kind=...``, install hints for missing ones."""

import importlib.util

import pytest

from hotloop.algorithms.loader import load_config
from hotloop.algorithms.run import engine_options
from hotloop.algorithms.tasks.tiny_model import build_tiny_model, tiny_llama_config
from hotloop.runtime.engine_factory import make_engine
from hotloop.runtime.torch_engine import TorchEngine


def test_engine_kind_defaults_to_torch_and_is_set_from_yaml_or_an_override(tmp_path):
    assert load_config().engine.kind == "torch"
    path = tmp_path / "run.yaml"
    path.write_text("engine: {kind: vllm, dtype: bfloat16}\n")
    assert load_config(path).engine.kind == "vllm" and load_config(path).engine.dtype == "bfloat16"
    config = load_config(None, ["engine.kind=vllm", "engine.memory_fraction=0.4"])
    assert config.engine.kind == "vllm"
    assert engine_options(config) == {"seed": 0, "model_dir": None, "gpu_memory_utilization": 0.4}


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["engine.kind=tensorrt"], "engine.kind"),
        (["engine.kind=sglang"], "engine.model_dir"),
        (["engine.dtype=bfloat16"], "engine.kind"),
        (["engine.kind=vllm", "engine.memory_fraction=1.5"], "engine.memory_fraction"),
    ],
)
def test_bad_engine_sections_fail_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_make_engine_builds_a_torch_engine_on_the_trainers_module():
    model = build_tiny_model(tiny_llama_config(14, hidden_size=32, layers=1, intermediate=64), seed=0)
    engine = make_engine(model, kind="torch", pad_token_id=0, eos_token_id=1, seed=0)
    assert isinstance(engine, TorchEngine) and engine.shares_weights_with(model)
    with pytest.raises(ValueError, match="kind: expected one of"):
        make_engine(model, kind="onnx", pad_token_id=0, eos_token_id=1)


@pytest.mark.parametrize("kind, package", [("vllm", "vllm"), ("sglang", "sglang")])
def test_a_missing_engine_package_raises_with_the_install_hint(kind, package):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    model = build_tiny_model(tiny_llama_config(14, hidden_size=32, layers=1, intermediate=64), seed=0)
    with pytest.raises(ImportError, match=rf'pip install "hotloop\[{kind}\]"'):
        make_engine(model, kind=kind, pad_token_id=0, eos_token_id=1, model_dir="/nonexistent")
