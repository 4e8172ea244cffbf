"""Drop-in replacements for Liger-Kernel 0.8.5's chunked losses, backed by hotloop's fused linear losses.

Migration is one import::

    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss        # before
    from hotloop.kernels.compat.liger import LigerFusedLinearDPOLoss     # after

Each class keeps Liger's name, constructor arguments (names, order, defaults), attributes, forward arguments
(Liger's orders: ``(lin_weight, _input, target, bias, ...)`` for DPO, CPO, ORPO, SimPO; ``(_input, lin_weight,
...)`` for KTO and GRPO; student then teacher for JSD) and return structure: ``(loss, (aux, ...))`` with the aux
tensors in Liger's order, or JSD's ``loss`` / ``(loss, soft_loss, hard_loss)``. The math runs in
``fused_linear_{dpo,kto,grpo,kl,sft}``; the classes (in ``_liger_preference`` and ``_liger_policy``, re-exported
here) only map arguments and assemble outputs:

- DPO, CPO, SimPO, ORPO → ``fused_linear_dpo_loss`` (``reference_free`` without a reference, ``length_normalize`` =
  ``average_log_prob``, ``nll_coef`` = ``alpha``, ``loss_type="orpo"``): 3 matmuls (2·N_a·V·D FLOPs each) with the
  ``"grouped"`` strategy (what ``"auto"`` picks unless one pair's ``[2T, V]`` fp32 block exceeds 1/8 of the available
  memory), 4 with ``"two_pass"``, + 1 for a reference head (on CUDA one more each: the Triton backward recomputes
  the logits). The classes add no matmul and no ``[N, V]``- or ``[V, D]``-sized pass over the direct call: the
  logits means cost ``N·D + V·D``;
- KTO → ``fused_linear_kto_loss`` (as DPO); GRPO → ``fused_linear_grpo_loss`` (3, CUDA 4; + 1 for a reference head);
- JSD → ``fused_linear_kl`` (Liger's β = 0 is ``"reverse_kl"``, β = 1 ``"kl"``, else ``"jsd"``; 4 matmuls, CUDA 6,
  ``"jsd"`` 8) plus ``fused_linear_sft_loss`` for the hard loss (3 more over the student, CUDA 4). Liger: 3 per
  loss, + 1 for a reference.

``chosen/rejected_logits_mean`` (and KTO's ``*_logits_sum``) are sums of the logits over all positions (padding
included, as Liger) without forming them: ``Σ_{i,v} (h_i·w_v + b_v) = (Σ_i h_i)·(Σ_v w_v) + n·Σ_v b_v``.

Differences from Liger, all deliberate:

- ``compiled`` and ``chunk_size`` are accepted and ignored: nothing is compiled (no warm-up); chunks are chosen by
  memory (``docs/fused-losses.md``). No host sync in backward (Liger compares ``grad_output`` with 1.0).
- DPO: ``loss_type="ipo"`` works (length-averaged log-ratios as TRL's IPO, whatever ``average_log_prob``; Liger
  raises NotImplementedError);
  ``label_smoothing`` is applied to ``"sigmoid"`` (cDPO; Liger ignores it there).
- Cached reference log-probs (Liger recomputes the reference head every step): DPO ``ref_chosen_logps``,
  ``ref_rejected_logps`` ``[B]`` and KTO ``ref_logps`` ``[B]`` keyword arguments, in the form the class returns
  (sums, or per-token means with ``average_log_prob``); GRPO already takes ``ref_per_token_logps``.
- GRPO: ``kl_estimator="k1" | "k2" | "k3"`` (Liger: k3 only). Without a reference (``use_ref_model=False``) there is
  no KL term (Liger compares the policy with itself: k3 = 0, gradient 0) and the KL output is 0. ``dr_grpo``
  without ``max_completion_length`` uses T. Token-level ``luspo`` ignores padding; ``vespo``'s sampler term covers
  completion tokens only; the ``dapo`` normalizer does no hidden all-reduce (pass ``num_items_in_batch``)
  (``losses/grpo.py``). ``vllm_is_ratio`` with ``old_per_token_logps=None`` costs one forward-only pass (the old
  log-probs are needed to express the ratio as sampler log-probs).
- KTO: ``kl`` must be a scalar (a float or one-element tensor).
- ORPO with ``compute_nll_loss=False`` or ``nll_target``: the NLL on ``target`` is taken out (and the one on
  ``nll_target`` added) by ``fused_linear_sft_loss`` on the chosen half, 3 matmuls over those rows each.
- Empty sequences (all targets ignored) count as length 1 where Liger divides 0 by 0.
"""

from ._liger_policy import LigerFusedLinearGRPOLoss, LigerFusedLinearJSDLoss
from ._liger_preference import (
    LigerFusedLinearCPOLoss,
    LigerFusedLinearDPOLoss,
    LigerFusedLinearKTOLoss,
    LigerFusedLinearORPOLoss,
    LigerFusedLinearSimPOLoss,
)

__all__ = [
    "LigerFusedLinearCPOLoss",
    "LigerFusedLinearDPOLoss",
    "LigerFusedLinearGRPOLoss",
    "LigerFusedLinearJSDLoss",
    "LigerFusedLinearKTOLoss",
    "LigerFusedLinearORPOLoss",
    "LigerFusedLinearSimPOLoss",
]
