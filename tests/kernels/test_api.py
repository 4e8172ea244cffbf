"""The kernel API's house rules, checked on the code itself: each loss family's options are declared once (every
public signature's default is its options dataclass's), the fused losses share one argument order, and the
modules of ``kernels/`` import each other without a cycle."""

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

from hotloop.algorithms.dpo import DPOConfig
from hotloop.algorithms.grpo import GRPOConfig
from hotloop.algorithms.kto import KTOConfig
from hotloop.kernels import (
    DPOOptions,
    FusedLinearDPOLoss,
    FusedLinearGRPOLoss,
    FusedLinearKL,
    FusedLinearKTOLoss,
    FusedLinearLogprob,
    FusedLinearSFTLoss,
    GRPOOptions,
    KLOptions,
    KTOOptions,
    dpo_loss,
    fused_linear_dpo_loss,
    fused_linear_grpo_loss,
    fused_linear_kl,
    fused_linear_kto_loss,
    fused_linear_logprob,
    fused_linear_sft_loss,
    grpo_loss,
    kl_penalty,
    kto_loss,
    orpo_loss,
)
from hotloop.kernels.fused_linear_dpo import reference_fused_linear_dpo_loss
from hotloop.kernels.fused_linear_kl import reference_fused_linear_kl
from hotloop.kernels.losses.kl_penalty import kl_per_token

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
FAMILIES = [
    (GRPOOptions, [grpo_loss, fused_linear_grpo_loss], FusedLinearGRPOLoss, GRPOConfig),
    (DPOOptions, [dpo_loss, fused_linear_dpo_loss], FusedLinearDPOLoss, DPOConfig),
    (KTOOptions, [kto_loss, fused_linear_kto_loss], FusedLinearKTOLoss, KTOConfig),
    (KLOptions, [fused_linear_kl], FusedLinearKL, None),
]
FUSED = [
    (fused_linear_logprob, FusedLinearLogprob),
    (fused_linear_sft_loss, FusedLinearSFTLoss),
    (fused_linear_dpo_loss, FusedLinearDPOLoss),
    (fused_linear_kto_loss, FusedLinearKTOLoss),
    (fused_linear_grpo_loss, FusedLinearGRPOLoss),
    (fused_linear_kl, FusedLinearKL),
]


def _defaults(fn) -> dict:
    params = inspect.signature(fn).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _option_defaults(options) -> dict:
    return {f.name: f.default for f in dataclasses.fields(options)}


def _non_default(value):
    """A valid value other than ``value`` for the options that tests below change one at a time."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, float):
        return value + 0.125
    return value


@pytest.mark.parametrize(
    "options, functions", [(o, f) for o, f, _, _ in FAMILIES], ids=lambda x: getattr(x, "__name__", "")
)
def test_every_function_takes_every_option_with_the_dataclass_default(options, functions):
    want = _option_defaults(options)
    for fn in functions:
        have = _defaults(fn)
        assert set(want) <= set(have), f"{fn.__name__} lacks options {sorted(set(want) - set(have))}"
        drifted = {name: have[name] for name in want if have[name] != want[name]}
        assert not drifted, f"{fn.__name__}: defaults {drifted} differ from {options.__name__}'s"


@pytest.mark.parametrize(
    "fn, options, names",
    [
        (orpo_loss, DPOOptions, ["beta"]),
        (kl_penalty, GRPOOptions, ["kl_estimator"]),
        (kl_per_token, GRPOOptions, ["kl_estimator"]),
        (reference_fused_linear_dpo_loss, DPOOptions, ["beta", "loss_type", "nll_coef", "reference_free"]),
        (reference_fused_linear_kl, KLOptions, ["divergence", "beta", "normalize"]),
    ],
)
def test_functions_with_some_of_a_familys_options_take_its_defaults(fn, options, names):
    have, want = _defaults(fn), _option_defaults(options)
    assert {n: have[n] for n in names} == {n: want[n] for n in names}


@pytest.mark.parametrize("options, module", [(o, m) for o, _, m, _ in FAMILIES], ids=lambda x: x.__name__)
def test_modules_take_every_option_as_a_keyword_and_check_it_now(options, module):
    assert module().options == options()
    for name, default in _option_defaults(options).items():
        value = _non_default(default)
        if value != default:
            assert getattr(module(**{name: value}).options, name) == value
    with pytest.raises(TypeError, match="no_such_option"):
        module(no_such_option=1.0)


@pytest.mark.parametrize("options, config", [(o, c) for o, _, _, c in FAMILIES if c], ids=lambda x: x.__name__)
def test_algorithm_configs_take_the_option_defaults_and_pass_their_values_on(options, config):
    want = _option_defaults(options)
    fields = {f.name: f.default for f in dataclasses.fields(config) if f.name in want}
    assert fields, f"{config.__name__} exposes no option of {options.__name__}"
    assert fields == {name: want[name] for name in fields}
    assert config().loss_options() == options()
    for name, default in fields.items():
        value = _non_default(default)
        if value != default:
            assert getattr(config(**{name: value}).loss_options(), name) == value


@pytest.mark.parametrize("fn, module", FUSED, ids=lambda x: x.__name__)
def test_fused_losses_take_hidden_weight_targets_bias_then_keywords_only(fn, module):
    for call in (fn, module.forward):
        params = [p for p in inspect.signature(call).parameters.values() if p.name != "self"]
        positional = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        assert positional == ["hidden", "weight", "targets", "bias"], f"{call.__qualname__}: {positional}"
    shared = {k: v for k, v in _defaults(module).items() if k in ("temperature", "ignore_index", "strategy")}
    assert shared == {k: _defaults(fn)[k] for k in shared}


@pytest.mark.parametrize(
    "options, kwargs, name",
    [
        (GRPOOptions, dict(beta=-0.1), "beta"),
        (GRPOOptions, dict(loss_type="cispo", delta=1.5), "delta"),
        (GRPOOptions, dict(sapo_temperature_neg=0.0), "sapo_temperature_neg"),
        (DPOOptions, dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
        (DPOOptions, dict(loss_type="orpo", nll_coef=1.0), "loss_type"),
        (KTOOptions, dict(undesirable_weight=-1.0), "undesirable_weight"),
        (KLOptions, dict(divergence="jsd", beta=1.0), "beta"),
    ],
)
def test_options_are_refused_in_the_one_wording(options, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected .+, got "):
        options(**kwargs)


def _imports(path: Path) -> set[str]:
    """Modules of ``kernels/`` that ``path`` imports anywhere (function-level imports too), as dotted names."""
    package = ".".join(("kernels", *path.relative_to(KERNELS).parent.parts))
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            found.update(f"{target}.{a.name}" for a in node.names)
            found.add(target)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (module -> modules it imports) as a path, or [] (depth-first search)."""
    done, path = set(), []

    def visit(name):
        if name in path:
            return path[path.index(name) :] + [name]
        if name in done:
            return []
        path.append(name)
        for target in sorted(graph[name]):
            found = visit(target)
            if found:
                return found
        path.pop()
        done.add(name)
        return []

    for name in sorted(graph):
        found = visit(name)
        if found:
            return found
    return []


def test_kernels_modules_import_each_other_without_a_cycle():
    files = {".".join(("kernels", *p.relative_to(KERNELS).with_suffix("").parts)): p for p in KERNELS.rglob("*.py")}
    modules = {name: p for name, p in files.items() if p.name != "__init__.py"}  # packages only re-export
    graph = {name: {m for m in _imports(p) if m in modules and m != name} for name, p in modules.items()}
    assert len(graph) > 20 and any(graph.values())
    assert _cycle(graph) == []
    assert _cycle({**graph, "kernels._stats": {"kernels.fused_linear_logprob"}})  # the check finds a cycle


ROOT = KERNELS.parent


def _absolute_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}


def test_the_error_helper_imports_nothing_from_hotloop_and_runtime_never_imports_kernels():
    assert not {m for m in _absolute_imports(ROOT / "_errors.py") if m.startswith("hotloop")}
    runtime = {p.name: _absolute_imports(p) for p in (ROOT / "runtime").glob("*.py")}
    assert any("hotloop._errors" in found for found in runtime.values())  # runtime does use the shared helper
    assert not {name: m for name, found in runtime.items() for m in found if m.startswith("hotloop.kernels")}


def _raised_texts(path: Path):
    """The string parts of every ``raise X(...)`` message in ``path``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
            for part in ast.walk(node.exc.args[0]):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    yield part.value


def test_every_layer_words_argument_errors_as_expected_got():
    files = [p for folder in ("kernels", "runtime", "algorithms") for p in (ROOT / folder).rglob("*.py")]
    texts = [(p.name, t) for p in files for t in _raised_texts(p)]
    assert len(texts) > 100
    assert [(name, t) for name, t in texts if " must be " in t or " must have " in t] == []
