"""Every option of hotloop's losses, declared once: one frozen dataclass per loss family with its defaults, what each
option means and the rules it must satisfy (checked in ``__post_init__``, worded by ``hotloop._errors``).

- :class:`GRPOOptions`: ``grpo_loss``, ``grpo_per_token``, ``fused_linear_grpo_loss``, ``FusedLinearGRPOLoss``,
  ``GRPOConfig``;
- :class:`DPOOptions`: ``dpo_loss``, ``orpo_loss`` (``beta``), ``fused_linear_dpo_loss``, ``FusedLinearDPOLoss``,
  ``DPOConfig``;
- :class:`KTOOptions`: ``kto_loss``, ``fused_linear_kto_loss``, ``FusedLinearKTOLoss``, ``KTOConfig``;
- :class:`KLOptions`: ``fused_linear_kl``, ``FusedLinearKL``.

Functions keep the options as keyword arguments whose defaults are read from here (``beta=GRPOOptions.beta``) and
build the dataclass first (:meth:`pick` of their ``locals()``), so a bad option is refused before any work; modules
take the fields as constructor keywords; algorithm configs read their defaults here and hand the dataclass over
(``GRPOConfig.loss_options()``). ``tests/kernels/test_api.py`` fails when a signature's default drifts. The loss
types' formulas are in the loss modules (``losses/grpo.py``, ``losses/dpo.py``, ``losses/kto.py``,
``fused_linear_kl.py``). Imports nothing from kernels/, so every loss module may import it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hotloop._errors import check_choice, is_real, require

KL_ESTIMATORS = ("k1", "k2", "k3")
"""Per-token KL estimators (``losses/kl_penalty.py``); ``"k3"`` is the default everywhere (Liger's only one)."""
DEFAULT_KL_ESTIMATOR = "k3"
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
"""The GRPO loss types with a PPO-style clip (δ and sequence-level ratios apply to these only)."""
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
)
"""Pairwise loss types of ``dpo_loss``; the fused loss also takes ``"orpo"``."""
DIVERGENCES = ("kl", "reverse_kl", "jsd")
KL_NORMALIZE = ("token", "sequence", "sum")


class _Options:
    """What the four option dataclasses share: building one from a function's keyword arguments."""

    @classmethod
    def pick(cls, arguments: dict):
        """The options among ``arguments`` (a function's ``locals()`` whose keyword options are this class's fields)."""
        return cls(**{f.name: arguments[f.name] for f in dataclasses.fields(cls)})


@dataclass(frozen=True, kw_only=True)
class GRPOOptions(_Options):
    """The options of the GRPO family, declared (defaults as Liger's ``LigerFusedLinearGRPOLoss``, beta 0) and
    checked here only: :func:`grpo_loss`, ``fused_linear_grpo_loss``, its module and ``GRPOConfig`` take theirs."""

    beta: float = 0.0
    """KL(π ‖ π_ref) weight (>= 0); 0: no KL term and no reference needed."""
    kl_estimator: str = DEFAULT_KL_ESTIMATOR
    """Per-token KL estimator, one of ``KL_ESTIMATORS``."""
    epsilon_low: float = 0.2
    """Lower clip range: ratios below 1 − epsilon_low stop pushing down (negative advantages)."""
    epsilon_high: float = 0.2
    """Upper clip range: ratios above 1 + epsilon_high stop pushing up (DAPO: 0.28; cispo: the absolute cap)."""
    delta: float | None = None
    """INTELLECT-2's two-sided clip of the ratio (> 0, clipped loss types only); None = off."""
    loss_type: str = "dapo"
    """Per-token loss and reduction, one of ``LOSS_TYPES`` (module docstring)."""
    importance_sampling_level: str = "token"
    """"token" (GRPO) or "sequence" (GSPO: one geometric-mean ratio per completion; clipped loss types only)."""
    sampler_is_cap: float | None = None
    """Truncation (> 0) of the sampler correction ``exp(old_logp − sampler_logp)`` (TIS); None = untruncated."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus ``− entropy_coef · entropy`` (needs ``entropy``)."""
    sapo_temperature_pos: float = 1.0
    """SAPO's τ for positive advantages (> 0)."""
    sapo_temperature_neg: float = 1.05
    """SAPO's τ for negative advantages (> 0)."""
    vespo_shape: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0)
    """VESPO's ``(k_pos, λ_pos, k_neg, λ_neg)``."""
    use_bias_correction_kl: bool = False
    """Multiply the per-token KL by the importance weight."""

    def __post_init__(self) -> None:
        check_choice("loss_type", self.loss_type, GRPO_LOSS_TYPES)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_choice("importance_sampling_level", self.importance_sampling_level, ("token", "sequence"))
        for name in ("beta", "epsilon_low", "epsilon_high"):
            require(
                is_real(getattr(self, name)) and getattr(self, name) >= 0,
                name,
                "a number >= 0",
                repr(getattr(self, name)),
            )
        require(is_real(self.entropy_coef), "entropy_coef", "a finite number", repr(self.entropy_coef))
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            require(
                is_real(getattr(self, name)) and getattr(self, name) > 0,
                name,
                "a number > 0",
                repr(getattr(self, name)),
            )
        for name in ("delta", "sampler_is_cap"):
            value = getattr(self, name)
            require(value is None or (is_real(value) and value > 0), name, "None or a number > 0", repr(value))
        require(
            self.delta is None or self.loss_type in CLIPPED,
            "delta",
            f"None with loss_type={self.loss_type!r} (a two-sided clip needs a loss_type in {CLIPPED})",
            self.delta,
        )
        whole = self.importance_sampling_level == "token" or self.loss_type in CLIPPED
        require(
            whole,
            "importance_sampling_level",
            f"'token' with loss_type={self.loss_type!r} ('sequence' needs a loss_type in {CLIPPED})",
            repr(self.importance_sampling_level),
        )
        shape = self.vespo_shape
        ok = isinstance(shape, tuple) and len(shape) == 4 and all(is_real(x) for x in shape)
        require(ok, "vespo_shape", "a tuple of 4 numbers (k_pos, lambda_pos, k_neg, lambda_neg)", repr(shape))
        require(
            isinstance(self.use_bias_correction_kl, bool),
            "use_bias_correction_kl",
            "a bool",
            repr(self.use_bias_correction_kl),
            TypeError,
        )


@dataclass(frozen=True, kw_only=True)
class DPOOptions(_Options):
    """The options of the DPO family, declared and checked here only: :func:`dpo_loss`, :func:`orpo_loss` (``beta``),
    ``fused_linear_dpo_loss``, its module and ``DPOConfig`` take theirs."""

    beta: float = 0.1
    """Inverse temperature β of the implicit reward β log(π/π_ref) (> 0); ORPO's weight λ of the odds-ratio term."""
    loss_type: str = "sigmoid"
    """Pairwise loss, one of ``DPO_LOSS_TYPES`` (``losses/dpo.py``); the fused loss also takes ``"orpo"``."""
    label_smoothing: float = 0.0
    """ε of sigmoid (cDPO, [0, 0.5]), robust ([0, 0.5)) and exo_pair ((0, 1), paper 1e-3); 0 for the others."""
    length_normalize: bool | None = None
    """Divide the log-probs by the completion lengths (SimPO); None: the loss type's default (True for ipo, as TRL;
    False otherwise); False with ipo is Azar et al.'s form on sequence sums."""
    gamma: float = 0.0
    """SimPO margin γ subtracted from β(ρ_c − ρ_r) (sigmoid only)."""
    nll_coef: float = 0.0
    """Weight of the chosen completions' NLL (RPO, CPO); 0 = no NLL term (ORPO has its own, weight 1)."""
    reference_free: bool = False
    """Use ``ref = 0`` (SimPO, CPO): no reference log-probs."""
    discopop_tau: float = 0.05
    """τ of discopop (> 0)."""

    def __post_init__(self) -> None:
        check_choice("loss_type", self.loss_type, (*DPO_LOSS_TYPES, "orpo"))
        for name in ("beta", "discopop_tau"):
            require(
                is_real(getattr(self, name)) and getattr(self, name) > 0,
                name,
                "a number > 0",
                repr(getattr(self, name)),
            )
        for name in ("label_smoothing", "gamma", "nll_coef"):
            require(is_real(getattr(self, name)), name, "a finite number", repr(getattr(self, name)), TypeError)
        require(isinstance(self.reference_free, bool), "reference_free", "a bool", repr(self.reference_free), TypeError)
        require(
            self.length_normalize is None or isinstance(self.length_normalize, bool),
            "length_normalize",
            "None or a bool",
            repr(self.length_normalize),
            TypeError,
        )
        self._check_combinations()

    def _check_combinations(self) -> None:
        eps = self.label_smoothing
        loss_type = self.loss_type
        ranges = {
            "exo_pair": (0 < eps < 1, "(0, 1) (paper: 1e-3)"),
            "robust": (0 <= eps < 0.5, "[0, 0.5)"),
            "sigmoid": (0 <= eps <= 0.5, "[0, 0.5]"),
        }
        ok, interval = ranges.get(loss_type, (eps == 0, "0 (it applies to sigmoid, robust and exo_pair)"))
        require(ok, "label_smoothing", f"a number in {interval} for loss_type={loss_type!r}", eps)
        require(
            self.gamma == 0 or loss_type == "sigmoid",
            "gamma",
            f"0 with loss_type={loss_type!r} (the SimPO margin applies to 'sigmoid')",
            self.gamma,
        )
        orpo_ok = loss_type != "orpo" or (self.nll_coef == 0 and not self.reference_free)
        require(
            orpo_ok,
            "loss_type",
            "'orpo' with nll_coef=0 and reference_free=False (ORPO has its own NLL term and no reference)",
            f"nll_coef={self.nll_coef}, reference_free={self.reference_free}",
        )

    def normalizes_length(self) -> bool:
        """Whether log-probs are divided by the completion lengths (``length_normalize``, None: ipo only)."""
        return self.loss_type == "ipo" if self.length_normalize is None else self.length_normalize


@dataclass(frozen=True, kw_only=True)
class KTOOptions(_Options):
    """The options of KTO, declared and checked here only: :func:`kto_loss`, ``fused_linear_kto_loss``, its module
    and ``KTOConfig`` take theirs."""

    beta: float = 0.1
    """Inverse temperature β of the implicit reward β · (log π − log π_ref) (> 0)."""
    desirable_weight: float = 1.0
    """λ_D: weight of the desirable examples' loss (>= 0)."""
    undesirable_weight: float = 1.0
    """λ_U: weight of the undesirable examples' loss (>= 0)."""
    length_normalize: bool = False
    """Use per-token means ``logps / max(lengths, 1)`` (and the same for the reference), Liger's average_log_prob."""

    def __post_init__(self) -> None:
        require(is_real(self.beta) and self.beta > 0, "beta", "a number > 0", repr(self.beta))
        for name in ("desirable_weight", "undesirable_weight"):
            value = getattr(self, name)
            require(is_real(value) and value >= 0, name, "a finite number >= 0", repr(value))
        require(
            isinstance(self.length_normalize, bool),
            "length_normalize",
            "a bool",
            repr(self.length_normalize),
            TypeError,
        )


@dataclass(frozen=True, kw_only=True)
class KLOptions(_Options):
    """The options of :func:`fused_linear_kl` and :class:`FusedLinearKL`: defaults and checks live here only."""

    divergence: str = "kl"
    """"kl" = KL(π ‖ π_ref), "reverse_kl" = KL(π_ref ‖ π), "jsd" = Liger's generalized JSD_β."""
    beta: float = 0.5
    """JSD weight of the reference, in (0, 1); unused by the two KLs."""
    normalize: str = "token"
    """"token" (mean over counted rows), "sequence" (mean over sequences of their token mean), "sum"."""

    def __post_init__(self) -> None:
        check_choice("divergence", self.divergence, DIVERGENCES)
        check_choice("normalize", self.normalize, KL_NORMALIZE)
        require(is_real(self.beta), "beta", "a finite number", repr(self.beta), TypeError)
        require(
            self.divergence != "jsd" or 0.0 < self.beta < 1.0,
            "beta",
            "a number in (0, 1) for divergence='jsd' (beta=0 is 'reverse_kl', beta=1 is 'kl')",
            self.beta,
        )
