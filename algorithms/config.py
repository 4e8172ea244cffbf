"""One run's configuration: nested frozen dataclasses, one per component, checked in ``__post_init__``.

Each default is declared once, in the dataclass of the component that owns it (``LoopConfig``,
``TrainerConfig``, ``DPOConfig``, ...); ``RunConfig()`` is nothing but those defaults. The settings
of a particular run (the tiny demo, a pretrained SmolLM2) are named presets in
:mod:`hotloop.algorithms.presets`, and :func:`hotloop.algorithms.loader.load_config` reads a YAML
file that names only what it changes over ``RunConfig()`` or over the preset it names::

    preset: demo                              # optional: start from hotloop.algorithms.presets.demo()
    algorithm: online-dpo
    dpo: {beta: 0.2, samples_per_prompt: 8}
    loop: {steps: 80, sync_every: 4}          # null or .inf: offline
    engine: {kind: vllm}                      # torch (default) | vllm | sglang

Unknown keys, unknown algorithms, ``sync_every < 1`` and a task without a reward fail with a
``ValueError`` naming the dotted field. Nothing here looks at the hardware: ``model.device`` is
resolved when a run starts (``hotloop.algorithms.run.resolve_device``).

Adding an algorithm: give it a frozen ``Config`` section field on :class:`RunConfig` and an entry
``name → (section, factory)`` in :data:`ALGORITHMS`; ``factory(section_config, context)`` gets a
:class:`hotloop.algorithms.base.BuildContext` and returns the ``Algorithm``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from hotloop.algorithms.dpo import DPOConfig, OfflineDPO, OnlineDPO
from hotloop.algorithms.grpo import GRPO, GRPOConfig
from hotloop.algorithms.kto import KTO, KTOConfig
from hotloop.algorithms.rejection_sampling import RejectionSampling, RejectionSamplingConfig
from hotloop.algorithms.rewards.judge import JudgeConfig
from hotloop.algorithms.rewards.style import StyleConfig
from hotloop.algorithms.rwr import RWR, RWRConfig
from hotloop.algorithms.self_rewarding import SelfRewardingConfig, SelfRewardingDPO
from hotloop.runtime.engine import SamplingParams
from hotloop.runtime.engine_factory import ENGINE_KINDS
from hotloop.runtime.loop_config import LoopConfig
from hotloop.runtime.trainer import TrainerConfig

TASKS = ("arithmetic", "preference", "word_problems", "jsonl")
REWARDS = ("exact_match", "math_verify", "reward_model", "preference_rule", "llm_judge")
"""Reward kinds: the task's verifier, math-verify, a sequence classifier, the rule-based style model
(:mod:`hotloop.algorithms.rewards.style`, settings in ``reward.style``) and a pointwise LLM judge
(``reward.judge``)."""
DEVICES = ("auto", "cpu", "cuda")

ALGORITHMS = {
    "online-dpo": ("dpo", OnlineDPO.from_config),
    "offline-dpo": ("dpo", OfflineDPO.from_config),
    "grpo": ("grpo", GRPO.from_config),
    "kto": ("kto", KTO.from_config),
    "rejection-sampling": ("rejection_sampling", RejectionSampling.from_config),
    "rwr": ("rwr", RWR.from_config),
    "self-rewarding": ("self_rewarding", SelfRewardingDPO.from_config),
}
"""Algorithm name → (RunConfig section holding its settings, factory(section, BuildContext))."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which policy to start from."""

    path: str | None = None
    """Local transformers causal-LM directory or ``.gguf`` file (needs ``hotloop[gguf]``; see
    :mod:`hotloop.algorithms.models`); None = the built-in tiny Llama after an SFT warm start."""
    warm_start_steps: int = 3000
    """SFT steps of the built-in warm start (cached under cache_dir)."""
    warm_start_error_rate: float = 0.7
    """Probability that the warm start's teacher drops a carry (makes the SFT policy imperfect)."""
    cache_dir: str = "~/.cache/hotloop"
    """Where warm-started models are cached."""
    device: str = "auto"
    """Where policy, reference, sampler and model-based rewards run: "auto" (cuda when available, else
    cpu), "cpu", "cuda" or "cuda:N"; an unavailable cuda fails when the run starts."""

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not (self.device in DEVICES or re.fullmatch(r"cuda:\d+", self.device)):
            raise ValueError(f"device: expected one of {DEVICES} or 'cuda:N', got {self.device!r}")
        _check_fields(
            self,
            (
                ("path", lambda v: v is None or (isinstance(v, str) and v), "None or a model directory"),
                ("warm_start_steps", lambda v: _is_int(v) and v >= 0, "an int >= 0"),
                ("warm_start_error_rate", lambda v: _is_real(v) and 0 <= v <= 1, "a float in [0, 1]"),
                ("cache_dir", lambda v: isinstance(v, str) and v, "a directory"),
            ),
        )


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """Where prompts come from."""

    name: str = "arithmetic"
    """"arithmetic" (verifiable), "preference" (rule-scored style task), "word_problems" (multi-step word
    problems scored by math-verify; needs a pretrained ``model.path``) or "jsonl" (prompts file)."""
    digits: int = 2
    """Operand digits of the arithmetic task."""
    op: str = "+"
    """Arithmetic operator, "+" or "-"."""
    word_steps: int = 2
    """Operations per problem of the word_problems task (1-5)."""
    prompts: str | None = None
    """JSONL file of {"prompt": ..., "answer": ...} rows (task "jsonl"); 10% become the held-out set."""
    eval_problems: int = 500
    """Held-out problems for greedy accuracy (at most the test split)."""

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"name: expected one of {TASKS}, got {self.name!r}")
        if self.name == "jsonl" and not self.prompts:
            raise ValueError("prompts: task 'jsonl' needs a JSONL file of prompts, got None")
        if not isinstance(self.eval_problems, int) or self.eval_problems < 1:
            raise ValueError(f"eval_problems: expected an int >= 1, got {self.eval_problems!r}")
        _check_fields(
            self,
            (
                ("digits", lambda v: _is_int(v) and 1 <= v <= 18, "an int in [1, 18]"),
                ("op", lambda v: v in ("+", "-"), "'+' or '-'"),
                ("prompts", lambda v: v is None or (isinstance(v, str) and v), "None or a JSONL file"),
            ),
        )


@dataclass(frozen=True, kw_only=True)
class PromptConfig:
    """How a prompt's text becomes the policy's input ids (Hugging Face tokenizers only; see
    :class:`hotloop.algorithms.tasks.tokenizer.HFTokenizer`)."""

    chat_template: bool | None = None
    """None = the tokenizer's chat template when it has one (a user turn, ``add_generation_prompt=True``);
    True = require one; False = raw text with the tokenizer's special tokens."""
    system_prompt: str | None = None
    """System turn before the prompt (None: none; the template may still write its own default)."""
    template_options: dict = field(default_factory=dict)
    """Extra keyword arguments of ``apply_chat_template``, e.g. {enable_thinking: false}."""

    def __post_init__(self) -> None:
        if self.chat_template not in (None, True, False):
            raise ValueError(f"chat_template: expected null, true or false, got {self.chat_template!r}")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError(f"system_prompt: expected a string or null, got {self.system_prompt!r}")
        if not isinstance(self.template_options, dict):
            raise ValueError(f"template_options: expected a mapping, got {self.template_options!r}")


@dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """How completions are scored: one reward kind, or a weighted mixture of several."""

    kind: str | None = None
    """One of REWARDS; None = the task's own verifier (arithmetic: exact_match; preference: its rule)."""
    model: str | None = None
    """Local sequence-classifier directory (kind "reward_model")."""
    style: StyleConfig = field(default_factory=StyleConfig)
    """Rules of the style reward model (kind "preference_rule")."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """Judge model and prompt (kind "llm_judge"); ``judge.model: policy`` lets the policy judge itself."""
    mixture: tuple[tuple[str, float], ...] = ()
    """(kind, weight) pairs, e.g. [[exact_match, 1.0], [reward_model, 0.2]]: r = Σ weight · r_kind
    (verifiable + non-verifiable); replaces kind when given."""

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in REWARDS:
            raise ValueError(f"kind: expected one of {REWARDS} or None, got {self.kind!r}")
        if self.mixture and self.kind is not None:
            raise ValueError(f"kind: expected None with a mixture (the mixture names its kinds), got {self.kind!r}")
        for i, item in enumerate(self.mixture):
            ok = isinstance(item, tuple) and len(item) == 2 and item[0] in REWARDS and isinstance(item[1], (int, float))
            if not ok or not (math.isfinite(item[1]) and item[1] >= 0):
                raise ValueError(f"mixture[{i}]: expected a (kind in {REWARDS}, finite weight >= 0) pair, got {item!r}")
        if self.mixture and not any(w > 0 for _, w in self.mixture):
            raise ValueError(f"mixture: expected at least one positive weight, got {self.mixture!r}")
        if "reward_model" in self.kinds and not self.model:
            raise ValueError("model: kind 'reward_model' needs a local model directory, got None")
        if "llm_judge" in self.kinds and not self.judge.model:
            raise ValueError("judge.model: kind 'llm_judge' needs a local causal-LM directory or 'policy', got None")

    @property
    def kinds(self) -> tuple[str | None, ...]:
        """The reward kinds this config combines (``(None,)``: the task's own verifier)."""
        return tuple(k for k, _ in self.mixture) if self.mixture else (self.kind,)


_PARAMS = SamplingParams()
"""The engine's sampling defaults, which :class:`SamplingConfig` shares (declared once, in ``SamplingParams``)."""


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """Sampler settings of the rollout engine (n comes from the algorithm); checked by ``SamplingParams``."""

    temperature: float = _PARAMS.temperature
    """Softmax temperature T; 0 means greedy."""
    top_p: float = _PARAMS.top_p
    top_k: int = _PARAMS.top_k
    max_new_tokens: int = _PARAMS.max_new_tokens
    max_batch_size: int = 512
    """Rows the engine decodes together."""
    stop_token_ids: tuple[int, ...] = _PARAMS.stop_token_ids
    """Token ids that end a completion besides eos (kept as its last token, so rewards see them)."""
    stop_strings: tuple[str, ...] = ()
    """Strings that end a completion, each one token of the run's tokenizer (mapped to its id at start)."""

    def __post_init__(self) -> None:
        SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            stop_token_ids=self.stop_token_ids,
        )
        _check_fields(self, (("max_batch_size", lambda v: _is_int(v) and v >= 1, "an int >= 1"),))
        if not isinstance(self.stop_strings, tuple) or not all(isinstance(t, str) and t for t in self.stop_strings):
            raise ValueError(f"stop_strings: expected a list of non-empty strings, got {self.stop_strings!r}")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Which rollout engine samples (``hotloop.runtime.engine_factory.make_engine``); always on the trainer's model."""

    kind: str = "torch"
    """"torch" (TorchEngine, the default), "vllm" (``pip install "hotloop[vllm]"``) or "sglang"
    (``"hotloop[sglang]"``, CUDA)."""
    model_dir: str | None = None
    """vllm / sglang: HF model directory the serving engine loads the architecture from; None = model.path
    (vllm may also write the trainer's model to a temporary directory)."""
    dtype: str = "auto"
    """vllm / sglang: weight dtype of the serving engine ("auto": the trainer's)."""
    memory_fraction: float | None = None
    """vllm / sglang: fraction of GPU memory the engine may take (gpu_memory_utilization /
    mem_fraction_static); None = the engine's default."""

    def __post_init__(self) -> None:
        if self.kind not in ENGINE_KINDS:
            raise ValueError(f"kind: expected one of {ENGINE_KINDS}, got {self.kind!r}")
        if self.kind == "torch" and (
            self.model_dir is not None or self.dtype != "auto" or self.memory_fraction is not None
        ):
            raise ValueError(
                f"kind: 'torch' samples from the trainer's module; expected model_dir, dtype and "
                f"memory_fraction unset, got model_dir={self.model_dir!r}, dtype={self.dtype!r}, "
                f"memory_fraction={self.memory_fraction!r}"
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: expected 'auto', 'float32', 'bfloat16' or 'float16', got {self.dtype!r}")
        if self.memory_fraction is not None and not (
            isinstance(self.memory_fraction, (int, float)) and 0 < self.memory_fraction <= 1
        ):
            raise ValueError(f"memory_fraction: expected None or a float in (0, 1], got {self.memory_fraction!r}")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A whole run: model, task, reward, algorithm and its section, sampler, trainer, loop."""

    algorithm: str = "online-dpo"
    """Name of a registered algorithm (see ALGORITHMS)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)
    rejection_sampling: RejectionSamplingConfig = field(default_factory=RejectionSamplingConfig)
    rwr: RWRConfig = field(default_factory=RWRConfig)
    self_rewarding: SelfRewardingConfig = field(default_factory=SelfRewardingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    """A kill (SIGKILL, power loss) loses at most ``checkpoint_every`` steps; SIGINT/SIGTERM lose none (they
    always checkpoint the step they interrupt). ``final_checkpoint`` governs only the checkpoint after the
    last step: True writes it, False does not, None writes it only when ``checkpoint_every > 0``."""

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: expected one of {sorted(ALGORITHMS)}, got {self.algorithm!r}")
        if self.task.name == "jsonl" and self.reward.kinds == (None,):
            raise ValueError(
                f"reward.kind: task 'jsonl' has no built-in verifier; expected one of {REWARDS} "
                f"(or a reward.mixture), got None (missing reward)"
            )
        if self.engine.kind == "sglang" and not (self.engine.model_dir or self.model.path):
            raise ValueError(
                "engine.model_dir: kind 'sglang' loads a model directory; expected engine.model_dir or "
                "model.path, got None for both"
            )
        if self.task.name == "word_problems" and self.model.path is None:
            raise ValueError(
                "model.path: task 'word_problems' needs a pretrained model (the built-in tiny model's "
                "tokenizer has no letters), got None; e.g. hotloop fetch-model smollm2-135m-instruct"
            )
        if self.dpo.pairs_file is not None and self.algorithm != "offline-dpo":
            raise ValueError(
                f"dpo.pairs_file: only algorithm 'offline-dpo' reads a pairs file, got algorithm {self.algorithm!r}"
            )

    @property
    def algorithm_section(self):
        """The config section of the chosen algorithm."""
        return getattr(self, ALGORITHMS[self.algorithm][0])


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_fields(section, checks) -> None:
    """Raise ``ValueError("name: expected X, got Y")`` for the first field of ``section`` failing its check."""
    for name, ok, expected in checks:
        value = getattr(section, name)
        if not ok(value):
            raise ValueError(f"{name}: expected {expected}, got {value!r}")
