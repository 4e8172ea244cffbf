"""The GRPO family vs Liger-Kernel 0.8.5's ``ppo_loss_fn`` in float64: every loss type and level, and the
bias-corrected KL. Skipped as a whole without Liger; the float64 tests of ``test_grpo`` never are."""

import pytest
import torch

from hotloop.kernels.losses.grpo import LOSS_TYPES, grpo_loss
from tests.helpers import assert_close
from tests.kernels.losses.test_grpo import B, T, _inputs

liger_grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")


LIGER_CASES = [(lt, "token") for lt in LOSS_TYPES] + [
    (lt, "sequence") for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
]


@pytest.mark.parametrize(("loss_type", "level"), LIGER_CASES)
def test_matches_liger_ppo_loss_fn_value_and_grad(loss_type, level):
    logp, old, ref, mask, adv = (t.detach().double() if t.is_floating_point() else t for t in _inputs())
    logp.requires_grad_()
    beta, is_ratio = 0.05, torch.exp(0.2 * torch.randn(B, T, dtype=torch.float64))
    # Liger's luspo sums padded tokens whenever its per-token loss is [B, T] (see grpo.py): compare with a full
    # mask at token level, and at sequence level (TRL's setup) without the terms that make it [B, T].
    if loss_type == "luspo" and level == "token":
        mask = torch.ones_like(mask)
    if loss_type == "luspo" and level == "sequence":
        beta, is_ratio = 0.0, torch.ones(B, 1, dtype=torch.float64)
    m = mask.double()
    eh = 1.3 if loss_type == "cispo" else 0.2
    sampler = old - is_ratio.log()
    delta = 1.2 if loss_type in ("grpo", "dapo") else None
    ours = grpo_loss(
        logp,
        adv.double(),
        mask,
        old_logp=old,
        ref_logp=ref,
        sampler_logp=sampler,
        beta=beta,
        loss_type=loss_type,
        epsilon_high=eh,
        importance_sampling_level=level,
        max_completion_length=T + 3,
        delta=delta,
    )
    theirs, liger_metrics = liger_grpo.LigerFusedLinearGRPOFunction.ppo_loss_fn(
        logp,
        m,
        adv.double(),
        m,
        ref_per_token_logps=ref,
        old_per_token_logps=old,
        beta=beta,
        loss_type=loss_type,
        epsilon_high=eh,
        importance_sampling_level=level,
        max_completion_length=T + 3,
        vllm_is_ratio=is_ratio,
        delta=delta,
    )
    assert_close(ours.loss, theirs, torch.float64, f"{loss_type}/{level}")
    g_ours, g_theirs = (torch.autograd.grad(x, logp)[0] for x in (ours.loss, theirs))
    assert_close(g_ours, g_theirs, torch.float64, "grad")
    if beta:
        assert_close(ours.metrics["kl"], liger_metrics[0], torch.float64, "kl")
    assert_close(ours.metrics["clip_ratio/region_mean"], liger_metrics[-1], torch.float64, "clip ratio")


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_bias_corrected_kl_matches_liger(level):
    logp, old, ref, mask, adv = (t.detach().double() if t.is_floating_point() else t for t in _inputs())
    m = mask.double()
    ours = grpo_loss(
        logp,
        adv,
        mask,
        old_logp=old,
        ref_logp=ref,
        beta=0.2,
        loss_type="bnpo",
        importance_sampling_level=level,
        use_bias_correction_kl=True,
    )
    theirs, (kl, _) = liger_grpo.LigerFusedLinearGRPOFunction.ppo_loss_fn(
        logp,
        m,
        adv,
        m,
        ref_per_token_logps=ref,
        old_per_token_logps=old,
        beta=0.2,
        loss_type="bnpo",
        importance_sampling_level=level,
        use_bias_correction_kl=True,
    )
    assert_close(ours.loss, theirs, torch.float64, "loss")
    assert_close(ours.metrics["kl"], kl, torch.float64, "kl")
