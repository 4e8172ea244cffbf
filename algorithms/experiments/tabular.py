"""Tajwar et al.'s didactic bandit as a one-token language model, so hotloop's own loop trains it.

Task (Tajwar et al. 2024, "Preference fine-tuning of LLMs should leverage suboptimal, on-policy
data", https://arxiv.org/abs/2404.14367, the didactic bandit): ``V = 100`` actions; the reference
policy π_ref is the histogram of 10,000 samples of ``tanh(X)``, ``X ~ Cauchy(−0.7, 0.4)``, in 100
equal bins on [−1, 1]; the rewards are

    R1(a) = exp(−((a − 70) / 10)²)   (peak where π_ref has little mass: E_ref[R1] ≈ 0.04)
    R2(a) = exp(−((a − 20) / 10)²)   (peak at π_ref's interior mode:     E_ref[R2] ≈ 0.38)

The interior mode of π_ref is near action 15–20; the two end bins collect the Cauchy tails
(≈ 7% and 4% of the mass), as ``tanh`` squashes them onto ±1.

Policy. :class:`TabularPolicy` is shaped like a causal LM: its backbone returns the constant hidden
state ``h = 1`` (D = 1) at every position and its LM head ``W`` ([V, 1]) holds the 100 logits, so
``log π(a) = log_softmax(W[:, 0])[a]``. A "prompt" is one token (id 0, ignored by the backbone) and a
completion is one action token, so ``hotloop.algorithms.logprobs.sequence_logprobs`` and the fused
log-prob kernel run on it unchanged and AdamW on ``W`` is tabular Adam on the logits. The kernel
computes in float32, so the weights are float32; the metrics are computed in float64 from them.

Engine. :class:`BanditEngine` is a ``RolloutEngine`` that samples exactly from ``softmax(W / T)``
(``torch.multinomial`` on float64 probabilities, generator seeded with ``SamplingParams.seed``),
with ``TorchEngine``'s sync rule: an engine on the trainer's own module only bumps the version;
for ``s != 1`` the loop's sync policy hands it a stale copy (``adopt_model``) that syncs load in place.

Metrics (exact, float64): expected reward ``Σ_a π(a) R(a)`` and ``KL(π ‖ π_ref) = Σ_a π(a) log(π(a)/π_ref(a))``.
Cost: O(V) per sample and per metric.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn

from hotloop.algorithms.tasks.arithmetic import Problem
from hotloop.runtime.engine import Completion, SamplingParams
from hotloop.runtime.weight_sync import named_tensors

NUM_ACTIONS = 100
REFERENCE_SAMPLES = 10_000
CAUCHY_LOC, CAUCHY_SCALE = -0.7, 0.4
REWARD_PEAKS = {"R1": 70, "R2": 20}
"""Reward name → the action where its Gaussian bump peaks (width 10)."""
PROMPT_TOKEN = 0
"""The one prompt token (also the pad id; the backbone ignores token ids)."""


def reference_probs(*, samples: int = REFERENCE_SAMPLES, seed: int = 0) -> torch.Tensor:
    """π_ref: histogram of ``samples`` draws of tanh(Cauchy(−0.7, 0.4)) in 100 bins on [−1, 1].

    Returns:
        [100] float64, sums to 1.
    """
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(samples, generator=generator, dtype=torch.float64)
    x = torch.tanh(CAUCHY_LOC + CAUCHY_SCALE * torch.tan(math.pi * (u - 0.5)))  # inverse-CDF Cauchy
    bins = ((x + 1) / 2 * NUM_ACTIONS).floor().clamp(0, NUM_ACTIONS - 1).long()
    counts = torch.bincount(bins, minlength=NUM_ACTIONS).double()
    if bool((counts == 0).any()):  # log π_ref would be −inf; does not happen for 10,000 samples
        raise ValueError(f"samples: {samples} draws leave {int((counts == 0).sum())} empty bins; expected none")
    return counts / samples


def reward_table(name: str) -> torch.Tensor:
    """R(a) for every action: ``exp(−((a − peak) / 10)²)``; [100] float64."""
    if name not in REWARD_PEAKS:
        raise ValueError(f"reward: expected one of {sorted(REWARD_PEAKS)}, got {name!r}")
    actions = torch.arange(NUM_ACTIONS, dtype=torch.float64)
    return torch.exp(-(((actions - REWARD_PEAKS[name]) / 10.0) ** 2))


def expected_reward(probs: torch.Tensor, rewards: torch.Tensor) -> float:
    """Exact ``Σ_a π(a) R(a)`` in float64."""
    return float((probs.double() * rewards.double()).sum())


def kl_divergence(probs: torch.Tensor, ref_probs: torch.Tensor) -> float:
    """Exact ``KL(π ‖ π_ref)`` in float64 (terms with π(a) = 0 contribute 0)."""
    p, q = probs.double(), ref_probs.double()
    terms = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.log()), torch.zeros_like(p))
    return float(terms.sum())


class _ConstantBackbone(nn.Module):
    """Returns ``last_hidden_state = 1`` ([B, L, 1]) whatever the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("one", torch.ones(1))

    def forward(self, input_ids: torch.Tensor, attention_mask=None, position_ids=None) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=self.one.expand(*input_ids.shape, 1))


class TabularPolicy(nn.Module):
    """A softmax policy over 100 actions in the layout of a causal LM (backbone + LM head).

    Args:
        logits: [V] initial logits (e.g. ``log π_ref``); stored as the float32 LM-head weight [V, 1].
    """

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        if logits.dim() != 1 or not bool(torch.isfinite(logits).all()):
            raise ValueError(f"logits: expected a finite 1-D tensor, got shape {tuple(logits.shape)}")
        self.model = _ConstantBackbone()
        self.lm_head = nn.Linear(1, logits.shape[0], bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(logits.detach().float()[:, None])

    def get_decoder(self) -> nn.Module:
        return self.model

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def probs(self, temperature: float = 1.0) -> torch.Tensor:
        """π(a) = softmax(W / T) in float64; [V]."""
        return torch.softmax(self.lm_head.weight.detach()[:, 0].double() / temperature, dim=0)


class ActionTokenizer:
    """Prompt text → ``[PROMPT_TOKEN]``; a completion ``[a]`` ↔ the text ``"a"``."""

    pad_id = PROMPT_TOKEN
    eos_id = None

    def encode(self, text: str) -> list[int]:
        return [PROMPT_TOKEN]

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


class BanditReward:
    """``RewardFn``: the reward table at each completion's action; float32 [n]."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table.double()

    def __call__(self, problems: list, texts: list[str]) -> torch.Tensor:
        return self.table[[int(t) for t in texts]].float()


def bandit_problems(count: int) -> list[Problem]:
    """``count`` copies of the bandit's one (empty) prompt, the pool the loop draws a step's prompts from."""
    return [Problem(prompt="", answer="")] * count


class BanditEngine:
    """Exact categorical sampling of one action per completion from a :class:`TabularPolicy`.

    Args:
        model: the trainer's policy (zero-copy, online) or a copy of it (semi-online / offline).
        seed: seed of the engine's own generator, used when ``SamplingParams.seed`` is None.
    """

    def __init__(self, model: TabularPolicy, *, seed: int = 0) -> None:
        if not isinstance(model, TabularPolicy):
            raise TypeError(f"model: expected a TabularPolicy, got {type(model).__name__}")
        self.model = model
        self.generator = torch.Generator().manual_seed(seed)
        self._version = 0

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def local_model(self) -> TabularPolicy:
        """The policy ``generate`` samples from (the trainer's own, or a copy)."""
        return self.model

    def shares_weights_with(self, module) -> bool:
        """True when this engine samples from ``module`` itself (online, zero-copy)."""
        return module is self.model

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """``sampling.n`` one-token completions per prompt, prompt-major, stamped with the weight version."""
        if sampling.top_p != 1.0 or sampling.top_k != 0:
            raise ValueError(
                f"sampling: BanditEngine samples the full softmax; expected top_p=1 and top_k=0, "
                f"got top_p={sampling.top_p}, top_k={sampling.top_k}"
            )
        rows = len(prompt_token_ids) * sampling.n
        logp = self.model.probs(sampling.logprob_temperature).log()
        if sampling.temperature == 0:
            actions = torch.full((rows,), int(logp.argmax()))
        else:
            generator = self.generator if sampling.seed is None else torch.Generator().manual_seed(sampling.seed)
            actions = torch.multinomial(logp.exp(), rows, replacement=True, generator=generator)
        return [
            Completion(
                prompt_index=r // sampling.n,
                token_ids=[int(a)],
                logprobs=[float(logp[a])],
                finish_reason="length",
                weight_version=self._version,
            )
            for r, a in enumerate(actions)
        ]

    def sync_weights(self, version: int, weights=None) -> None:
        """Record ``version``; copy ``weights`` ((name, tensor) pairs or a mapping) into the policy in place when
        given."""
        if not isinstance(version, int) or version < self._version:
            raise ValueError(f"version: expected an int >= current version {self._version}, got {version!r}")
        if weights is not None:
            self.model.load_state_dict(dict(named_tensors(weights)), strict=True)
        self._version = version

    def adopt_model(self, model: TabularPolicy) -> None:
        """Sample from ``model`` from now on (the loop's stale copy of the trainer's policy, semi-online / offline)."""
        self.model = model

    def sleep(self) -> None:
        """Nothing to free."""

    def wake(self) -> None:
        """Nothing to reacquire."""

    def flush_cache(self) -> None:
        """No cache."""


def logprobs(
    model: TabularPolicy, prompts: list[list[int]], completions: list[list[int]], temperature: float = 1.0
) -> list[list[float]]:
    """Log-prob of each completion's actions under ``softmax(W / T)``: the trainer side of the loop's sync check."""
    logp = model.probs(temperature).log()
    return [[float(logp[a]) for a in c] for c in completions]
