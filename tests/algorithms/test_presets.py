"""Each default is declared once: ``RunConfig()`` is its components' own defaults, the YAML and CLI paths add no
values of their own, and the presets differ from ``RunConfig()`` only where they say so."""

import dataclasses
import subprocess
import sys
import typing

import pytest

from hotloop.algorithms.cli import _parser, config_from_args, flag_overrides
from hotloop.algorithms.config import RunConfig, SamplingConfig
from hotloop.algorithms.loader import load_config
from hotloop.algorithms.presets import PRESETS, demo
from hotloop.runtime.engine import SamplingParams


def test_every_section_of_the_run_config_is_its_components_own_default():
    hints, config = typing.get_type_hints(RunConfig), RunConfig()
    sections = [f.name for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(hints[f.name])]
    assert {"loop", "trainer", "dpo", "grpo", "sampling"} <= set(sections)
    for name in sections:
        assert getattr(config, name) == hints[name](), name  # a restated default with another value fails here


def test_the_sampling_section_shares_the_engines_defaults():
    shared = {f.name for f in dataclasses.fields(SamplingConfig)} & {f.name for f in dataclasses.fields(SamplingParams)}
    assert {"temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids"} <= shared
    for name in shared:
        assert getattr(SamplingConfig(), name) == getattr(SamplingParams(), name), name


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -0.5, True])
def test_a_bad_temperature_is_refused_once_with_the_engines_wording(value):
    with pytest.raises(ValueError) as engine_error:
        SamplingParams(temperature=value)
    with pytest.raises(ValueError) as config_error:
        load_config(None, [f"sampling.temperature={value}"])
    assert str(config_error.value) == f"sampling.{engine_error.value}"


def test_an_empty_yaml_file_and_no_file_are_the_dataclass_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing changed\n")
    assert load_config() == RunConfig() == load_config(tmp_path / "empty.yaml")
    args = _parser().parse_args(["train", str(tmp_path / "empty.yaml")])
    assert flag_overrides(args) == [] and config_from_args(args) == RunConfig()


def test_hotloop_demo_without_flags_is_the_demo_preset_and_each_flag_sets_one_field():
    args = _parser().parse_args(["demo"])
    assert flag_overrides(args) == [] and config_from_args(args) == demo()
    given = config_from_args(
        _parser().parse_args(
            ["demo", "--out", "o", "--seed", "3", "--steps", "7", "--sync-every", "inf", "--algo", "grpo"]
        )
    )
    changed = dataclasses.replace(demo().loop, out_dir="o", seed=3, steps=7, sync_every=float("inf"))
    assert given == dataclasses.replace(demo(), algorithm="grpo", loop=changed)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_yaml_file_naming_a_preset_starts_from_it(tmp_path, name):
    (tmp_path / "run.yaml").write_text(f"preset: {name}\nloop: {{steps: 3}}\n")
    preset = PRESETS[name]()
    assert preset != RunConfig()
    assert load_config(tmp_path / "run.yaml") == dataclasses.replace(
        preset, loop=dataclasses.replace(preset.loop, steps=3)
    )
    assert load_config(None, [f"preset={name}"]) == preset


def test_an_unknown_preset_is_a_config_error_naming_the_key():
    with pytest.raises(ValueError, match=r"^preset: expected one of \['demo', 'smollm2'\] or null, got 'tiny'"):
        load_config(None, ["preset=tiny"])


def test_the_experiments_import_without_the_cli():
    code = (
        "import sys, hotloop.algorithms.experiments.arithmetic, hotloop.algorithms.experiments.compare; "
        "print(sorted(m for m in sys.modules if m == 'hotloop.algorithms.cli'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
