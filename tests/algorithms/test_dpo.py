"""DPO family: pair construction (online best-vs-worst, offline replay) and the loss's wiring."""

import math

import pytest
import torch

from hotloop.algorithms.base import pack_rows
from hotloop.algorithms.dpo import DPOConfig, OfflineDPO, OnlineDPO
from hotloop.algorithms.preference_data import PreferencePair, best_worst_pairs
from hotloop.runtime.engine import Completion

PAD = 0


def _completions(groups: list[list[list[int]]], version: int = 3) -> list[Completion]:
    return [
        Completion(
            prompt_index=p, token_ids=ids, logprobs=[-1.0] * len(ids), finish_reason="stop", weight_version=version
        )
        for p, group in enumerate(groups)
        for ids in group
    ]


def test_online_dpo_pairs_best_with_worst_and_skips_groups_without_contrast():
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 4]]
    groups = [
        [[10, 2], [11, 12, 2], [13, 2], [14, 2]],  # rewards 0.2, 0.9, 0.5, 0.1 -> (11,12) vs (14)
        [[15, 2], [16, 2], [17, 2], [18, 2]],  # all equal -> skipped
        [[19, 2], [20, 2], [21, 2], [22, 2]],
    ]  # 1, 0, 1, 0 -> first correct vs last incorrect
    rewards = torch.tensor([0.2, 0.9, 0.5, 0.1, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    algo = OnlineDPO(DPOConfig(samples_per_prompt=4), pad_token_id=PAD)
    batch = algo.build_batch([None] * 3, prompts, _completions(groups), rewards)
    assert batch.chosen.tolist() == [0, 2] and batch.rejected.tolist() == [1, 3]
    expected = [prompts[0] + [11, 12, 2], prompts[0] + [14, 2], prompts[2] + [19, 2], prompts[2] + [22, 2]]
    for row, ids in enumerate(expected):
        assert batch.input_ids[row, : len(ids)].tolist() == ids
        assert batch.attention_mask[row].sum().item() == len(ids)
    assert batch.completion_mask[0].tolist()[:6] == [0, 0, 0, 1, 1, 1]
    assert batch.rewards.tolist() == pytest.approx([0.9, 0.1, 1.0, 0.0])
    assert batch.sampler_version == 3


def test_online_dpo_returns_none_when_no_group_has_contrast():
    algo = OnlineDPO(DPOConfig(samples_per_prompt=2), pad_token_id=PAD)
    completions = _completions([[[3, 2], [4, 2]], [[5, 2], [6, 2]]])
    assert algo.build_batch([None] * 2, [[1, 3], [1, 4]], completions, torch.tensor([1.0, 1.0, 0.0, 0.0])) is None


def test_best_worst_pairs_takes_ith_best_with_ith_worst_while_rewards_differ():
    rewards = torch.tensor([0.0, 3.0, 1.0, 2.0, 2.0, 2.0])
    assert best_worst_pairs(rewards, [[0, 1, 2, 3], [4, 5]], pairs_per_group=2) == [(1, 0), (3, 2)]


def test_offline_dpo_replays_stored_pairs_of_the_drawn_prompts_only():
    pairs = [PreferencePair((1, 5), (7, 2), (8, 2)), PreferencePair((1, 6), (9, 9, 2), (3, 2), 0.7, 0.2)]
    algo = OfflineDPO(DPOConfig(samples_per_prompt=2), pad_token_id=PAD, pairs=pairs, problems=[], version=0)
    assert algo.samples_per_prompt == 0
    batch = algo.build_batch([None] * 2, [[1, 6], [1, 4]], [], torch.zeros(0))
    assert batch.input_ids.tolist() == [[1, 6, 9, 9, 2], [1, 6, 3, 2, PAD]]
    assert batch.rewards.tolist() == pytest.approx([0.7, 0.2]) and batch.sampler_version == 0
    assert algo.build_batch([None], [[1, 4]], [], torch.zeros(0)) is None


def test_offline_dpo_from_policy_builds_its_set_once_from_the_engines_samples():
    class Engine:
        weight_version, calls = 0, 0

        def generate(self, prompt_ids, sampling):
            Engine.calls += 1
            return _completions([[[3 + i, 2] for i in range(sampling.n)] for _ in prompt_ids], version=0)

    from hotloop.runtime.engine import SamplingParams

    problems = [object(), object()]
    reward = lambda probs, texts: torch.tensor([float(t == "x") for t in texts])  # noqa: E731
    decode = lambda ids: "x" if ids[0] == 4 else "y"  # noqa: E731
    algo = OfflineDPO.from_policy(
        DPOConfig(samples_per_prompt=4),
        pad_token_id=PAD,
        engine=Engine(),
        problems=problems,
        prompt_ids=[[1, 5], [1, 6]],
        reward_fn=reward,
        decode=decode,
        sampling=SamplingParams(),
    )
    assert Engine.calls == 1 and sorted(algo.prompts()) == [(1, 5), (1, 6)]
    assert all(p.chosen_ids == (4, 2) and p.rejected_ids == (6, 2) for ps in algo.pairs.values() for p in ps)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_gradient_raises_chosen_over_rejected_logprob(loss_type):
    """At policy == reference both widen the margin the loss reads: summed log-probs for sigmoid, per-token means
    for IPO (its default length normalisation; the summed margin may shrink when lengths differ)."""
    from hotloop.algorithms.logprobs import sequence_logprobs
    from hotloop.algorithms.tasks.tiny_model import build_tiny_model, tiny_llama_config
    from hotloop.runtime.trainer import make_reference

    model = build_tiny_model(tiny_llama_config(17, hidden_size=32, layers=1), seed=int(torch.randint(100, ())))
    reference = make_reference(model)
    pairs = [PreferencePair((1, 5, 6), (7, 8, 2), (9, 2)), PreferencePair((1, 4), (10, 2), (11, 12, 13, 2))]
    from hotloop.algorithms.preference_data import pair_batch

    batch = pair_batch(pairs, PAD, version=0)
    algo = OnlineDPO(DPOConfig(beta=0.5, loss_type=loss_type, samples_per_prompt=2), pad_token_id=PAD)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5 if loss_type == "sigmoid" else 0.1)
    lengths = batch.completion_mask.sum(-1) if loss_type == "ipo" else 1
    margin = lambda: (lambda s: (s[batch.chosen] - s[batch.rejected]).sum().item())(  # noqa: E731
        sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_mask) / lengths
    )
    start = margin()
    out = algo.loss(model, batch, reference=reference)
    assert out.metrics["kl"].abs().item() < 1e-6  # policy == reference before the step
    out.loss.backward()
    optimizer.step()
    assert margin() > start


def test_pack_rows_right_pads_and_marks_completions():
    ids, mask, comp = pack_rows([[1, 5], [1, 6, 7]], [[8, 2], [2]], PAD)
    assert ids.tolist() == [[1, 5, 8, 2], [1, 6, 7, 2]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]] and comp.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]


def test_dpo_config_names_the_bad_field():
    with pytest.raises(ValueError, match="loss_type"):
        DPOConfig(loss_type="kto")
    with pytest.raises(ValueError, match="pairs_per_prompt"):
        DPOConfig(samples_per_prompt=4, pairs_per_prompt=3)


# -- offline DPO from a preference file -----------------------------------------------------------------

TOK_ALPHABET = "0123456789+="


def _pairs_file(tmp_path, rows, name="pairs.jsonl"):
    import json

    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _file_dpo(tmp_path, rows, **config):
    from hotloop.algorithms.tasks import CharTokenizer

    tok = CharTokenizer(TOK_ALPHABET)
    algo = OfflineDPO.from_file(
        DPOConfig(samples_per_prompt=2, **config),
        path=_pairs_file(tmp_path, rows),
        pad_token_id=tok.pad_id,
        encode=tok.encode,
        eos_token_id=tok.eos_id,
    )
    return algo, tok


ROWS = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)} for a in (3, 7, 12) for b in (5, 9)]


def test_pairs_file_gives_prompt_and_completion_ids_with_eos_and_its_prompts_as_problems(tmp_path):
    rows = ROWS[:2] + [{"prompt": "3+5=", "chosen": "8", "rejected": "80"}]
    algo, tok = _file_dpo(tmp_path, rows)
    assert [p.prompt for p in algo.problems] == ["3+5=", "3+9="]
    assert algo.prompt_pool(["the run's own training problems"]) is algo.problems  # the loop draws these
    assert OnlineDPO(DPOConfig(), pad_token_id=tok.pad_id).prompt_pool(ROWS) is ROWS
    first = algo.pairs[tuple(tok.encode("3+5="))]
    assert [p.chosen_ids for p in first] == [(*tok.encode("8", add_bos=False), tok.eos_id)] * 2
    assert first[1].rejected_ids == (*tok.encode("80", add_bos=False), tok.eos_id)
    batch = algo.build_batch([None], [tok.encode("3+5=")], [], torch.zeros(0))
    assert batch.chosen.tolist() == [0, 2] and batch.stored_row.tolist() == [0, 1, 4, 5]  # every stored pair


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"prompt": "1+1=", "chosen": "2"}', "missing key 'rejected'"),
        ('{"prompt": "1+1=", "chosen": "2", "rejected": 3}', "key 'rejected': expected a string, got 3"),
        ('{"prompt": "1+1=", "chosen": "2", ', "invalid JSON"),
        ('["1+1=", "2", "3"]', "expected a JSON object"),
        ('{"prompt": "1+1=", "chosen": "two", "rejected": "3"}', "not in the alphabet"),
    ],
)
def test_malformed_pairs_line_error_names_the_file_the_line_and_the_problem(tmp_path, bad_line, message):
    with pytest.raises(ValueError, match=r"pairs\.jsonl:3: .*" + message) as info:
        _file_dpo(tmp_path, [ROWS[0], "", bad_line, ROWS[1]])  # a blank line still counts
    assert str(tmp_path) in str(info.value)


def test_empty_pairs_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="at least one line"):
        _file_dpo(tmp_path, ["", "  "])


def _tiny_policy(tok, seed=0):
    from hotloop.algorithms.tasks.tiny_model import build_tiny_model, tiny_llama_config
    from hotloop.runtime.trainer import make_reference

    model = build_tiny_model(tiny_llama_config(tok.vocab_size, hidden_size=32, layers=1), seed=seed)
    return model, make_reference(model)


def test_offline_reference_logprobs_are_computed_once_and_equal_a_fresh_forward(tmp_path):
    from hotloop.algorithms.logprobs import sequence_logprobs

    algo, tok = _file_dpo(tmp_path, ROWS)
    model, reference = _tiny_policy(tok)
    forwards = []
    reference.get_decoder().register_forward_hook(lambda *_: forwards.append(1))  # log-probs skip the top module
    prompt_ids = [tok.encode(r["prompt"]) for r in ROWS]
    for step in range(3):
        batch = algo.build_batch([None] * 2, prompt_ids[2 * step : 2 * step + 2], [], torch.zeros(0))
        algo.loss(model, batch, reference=reference)
    assert len(forwards) == 1  # one chunk for the whole set, none per step
    batch = algo.build_batch([None] * len(ROWS), prompt_ids[::-1], [], torch.zeros(0))
    fresh = sequence_logprobs(reference, batch.input_ids, batch.attention_mask, batch.completion_mask)
    torch.testing.assert_close(algo.reference_logps(reference, batch), fresh, rtol=1e-5, atol=1e-5)
    assert len(forwards) == 2  # only the fresh forward above


def test_offline_dpo_from_a_file_lowers_its_loss_on_a_fixed_seed(tmp_path):
    from hotloop.runtime.trainer import Trainer, TrainerConfig

    algo, tok = _file_dpo(tmp_path, ROWS, beta=0.5)
    model, reference = _tiny_policy(tok, seed=0)
    trainer = Trainer(model, TrainerConfig(lr=1e-2, seed=0), reference=reference)
    batch = algo.build_batch([None] * len(ROWS), [tok.encode(r["prompt"]) for r in ROWS], [], torch.zeros(0))
    losses = [trainer.step(lambda m, b: algo.loss(m, b, reference=reference), [batch])["loss"] for _ in range(15)]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference: −log σ(0)
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < min(losses[:5])
