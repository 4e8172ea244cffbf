"""Tests for the built-in tasks: tokenizer, arithmetic and preference tasks, tiny model, SFT warm start."""

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from hotloop.algorithms.tasks import (
    ArithmeticTask,
    CharTokenizer,
    PreferenceTask,
    Problem,
    build_tiny_model,
    complete,
    greedy_accuracy,
    sft_warm_start,
    tiny_llama_config,
    warm_start,
)
from hotloop.algorithms.tasks.warm_start import IGNORE_INDEX, _sft_batch, sft_loss


def _no_carry_add(a: int, b: int) -> str:
    """a + b with every carry dropped: each column is (x + y) mod 10."""
    da, db = str(a).zfill(4), str(b).zfill(4)
    return "".join(str((int(x) + int(y)) % 10) for x, y in zip(da, db)).lstrip("0") or "0"


# -- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_round_trips_random_strings_and_survives_save_load(tmp_path):
    tok = CharTokenizer()
    rng = random.Random(7)
    for _ in range(50):
        text = "".join(rng.choice(tok.alphabet) for _ in range(rng.randrange(0, 13)))
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and len(ids) == len(text) + 1
        assert tok.decode(ids) == text
        assert tok.encode(text, add_bos=False) == ids[1:]
    tok.save(tmp_path)
    loaded = CharTokenizer.load(tmp_path)
    assert loaded == tok and loaded.vocab_size == len(tok.alphabet) + 3 == tok.vocab_size


def test_tokenizer_decode_stops_at_eos_and_skips_pad_and_bos():
    tok = CharTokenizer()
    ids = [
        tok.pad_id,
        tok.pad_id,
        *tok.encode("12+3="),
        *tok.encode("15", add_bos=False),
        tok.eos_id,
        *tok.encode("99", add_bos=False),
    ]
    assert tok.decode(ids) == "12+3=15"
    assert tok.decode(torch.tensor(ids)) == "12+3=15"
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)


def test_tokenizer_rejects_unknown_characters_and_bad_alphabets():
    with pytest.raises(ValueError, match="text"):
        CharTokenizer().encode("1+a")
    with pytest.raises(ValueError, match="alphabet"):
        CharTokenizer("112")
    with pytest.raises(ValueError, match="alphabet"):
        CharTokenizer("")


# -- arithmetic ---------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["+", "-"])
def test_arithmetic_problems_are_deterministic_correct_and_splits_disjoint(op):
    task = ArithmeticTask(digits=2, op=op, seed=3)
    train, test = task.problems(500, "train"), task.problems(200, "test")
    assert train == ArithmeticTask(digits=2, op=op, seed=3).problems(500, "train")
    assert train != ArithmeticTask(digits=2, op=op, seed=4).problems(500, "train")
    all_train = {p.prompt for p in task.problems(task.split_size("train"), "train")}
    all_test = {p.prompt for p in task.problems(task.split_size("test"), "test")}
    assert not all_train & all_test
    assert len(all_train) + len(all_test) == (10_000 if op == "+" else 5050)
    assert 0.05 < len(all_test) / (len(all_train) + len(all_test)) < 0.15
    for p in train + test:
        assert p.prompt.endswith("=") and p.answer == str(eval(p.prompt[:-1]))
    assert len({p.prompt for p in train}) == 500


def test_arithmetic_split_does_not_depend_on_the_seed():
    a = {p.prompt for p in ArithmeticTask(seed=0).problems(300, "test")}
    b = {p.prompt for p in ArithmeticTask(seed=1).problems(ArithmeticTask().split_size("train"), "train")}
    assert not a & b


def test_arithmetic_score_is_exact_match_after_stripping():
    task, p = ArithmeticTask(), Problem("12+39=", "51")
    assert task.score(p, "51") == 1.0 and task.score(p, " 51\n") == 1.0
    assert task.score(p, "510") == 0.0 and task.score(p, "5") == 0.0 and task.score(p, "5 1") == 0.0


def test_teacher_is_exact_without_carries_and_drops_every_carry_at_rate_one():
    task, rng = ArithmeticTask(), random.Random(0)
    for p in task.problems(400):
        a, b = map(int, p.prompt[:-1].split("+"))
        assert task.teacher(p, rng, 0.0) == p.answer
        dropped = task.teacher(p, rng, 1.0)
        assert dropped == _no_carry_add(a, b)
        assert (dropped == p.answer) == (task.carries(p) == 0)


@pytest.mark.parametrize("error_rate", [0.3, 0.7])
def test_teacher_error_rate_per_carry_matches_request(error_rate):
    task, rng = ArithmeticTask(), random.Random(1)
    pool = task.problems(task.split_size("train"))
    for carries in (1, 2):
        group = [p for p in pool if task.carries(p) == carries]
        wrong = 0
        for _ in range(3000):
            p = rng.choice(group)
            wrong += task.teacher(p, rng, error_rate) != p.answer
        expected = 1 - (1 - error_rate) ** carries
        assert abs(wrong / 3000 - expected) < 0.04, (carries, wrong / 3000, expected)


def test_subtraction_teacher_drops_borrows_only():
    task, rng = ArithmeticTask(op="-"), random.Random(2)
    for p in task.problems(300):
        a, b = map(int, p.prompt[:-1].split("-"))
        assert a >= b
        out = task.teacher(p, rng, 1.0)
        assert (out == p.answer) == (task.carries(p) == 0)
        if task.carries(p):
            assert int(out) > int(p.answer)  # a dropped borrow leaves a higher digit too large


def test_arithmetic_validates_arguments():
    with pytest.raises(ValueError, match="digits"):
        ArithmeticTask(digits=0)
    with pytest.raises(ValueError, match="op"):
        ArithmeticTask(op="/")
    task = ArithmeticTask(digits=1)
    with pytest.raises(ValueError, match="split"):
        task.problems(3, "valid")
    with pytest.raises(ValueError, match="n"):
        task.problems(task.split_size("test") + 1, "test")
    with pytest.raises(ValueError, match="error_rate"):
        task.teacher(task.problems(1)[0], random.Random(0), 1.5)


# -- preference -----------------------------------------------------------------------------------


def test_preference_score_grades_length_format_and_first_digit():
    task = PreferenceTask(target_length=6)
    p = Problem("4719=", "")
    assert task.score(p, "412345") == 1.0
    assert task.score(p, "") == 0.0
    assert task.score(p, "512345") == pytest.approx(2 / 3)
    assert task.score(p, "41234") == pytest.approx((1 + 5 / 6 + 1) / 3)
    assert task.score(p, "41+345") == pytest.approx((5 / 6 + 1 + 1) / 3)


def test_preference_teacher_is_perfect_at_zero_error_and_worse_at_high_error():
    task, rng = PreferenceTask(), random.Random(3)
    problems = task.problems(300, "train")
    assert all(task.score(p, task.teacher(p, rng, 0.0)) == 1.0 for p in problems)
    noisy = sum(task.score(p, task.teacher(p, rng, 0.8)) for p in problems) / len(problems)
    assert 0.3 < noisy < 0.8


def test_preference_splits_are_deterministic_and_disjoint():
    task = PreferenceTask(seed=5)
    assert task.problems(50, "test") == PreferenceTask(seed=5).problems(50, "test")
    train = {p.prompt for p in task.problems(task.split_size("train"), "train")}
    test = {p.prompt for p in task.problems(task.split_size("test"), "test")}
    assert not train & test and len(train) + len(test) == 11110


# -- tiny model -----------------------------------------------------------------------------------


def test_tiny_model_forward_shapes_untied_head_and_seeded_init():
    config = tiny_llama_config(23, hidden_size=32, layers=1, heads=4, kv_heads=2, intermediate=48, max_position=16)
    before = torch.get_rng_state()
    model = build_tiny_model(config, seed=11)
    assert torch.equal(before, torch.get_rng_state())
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 23, (3, 7))
    out = model(ids, output_hidden_states=True)
    assert out.logits.shape == (3, 7, 23) and out.hidden_states[-1].shape == (3, 7, 32)
    same = build_tiny_model(config, seed=11)
    other = build_tiny_model(config, seed=12)
    assert torch.equal(same.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)


def test_tiny_model_config_validates():
    with pytest.raises(ValueError, match="hidden_size"):
        tiny_llama_config(20, hidden_size=30, heads=4)
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_llama_config(0)
    with pytest.raises(TypeError, match="config"):
        build_tiny_model({"vocab_size": 20})


# -- warm start -----------------------------------------------------------------------------------


def test_sft_batch_masks_the_prompt_and_ends_with_eos():
    task, tok = ArithmeticTask(), CharTokenizer()
    problems = [Problem("7+5=", "12"), Problem("13+48=", "61")]
    ids, mask, labels = _sft_batch(task, tok, problems, random.Random(0), 0.0)
    for i, p in enumerate(problems):
        n_prompt = len(p.prompt) + 1
        assert (labels[i, :n_prompt] == IGNORE_INDEX).all()
        kept = labels[i][labels[i] != IGNORE_INDEX].tolist()
        assert kept == tok.encode(p.answer, add_bos=False) + [tok.eos_id]
        assert mask[i].sum() == n_prompt + len(p.answer) + 1


def test_sft_loss_equals_cross_entropy_on_the_model_logits():
    tok = CharTokenizer()
    model = build_tiny_model(tiny_llama_config(tok.vocab_size, hidden_size=32, intermediate=48), seed=0)
    ids, mask, labels = _sft_batch(ArithmeticTask(), tok, ArithmeticTask().problems(5), random.Random(1), 0.5)
    logits = model(input_ids=ids, attention_mask=mask).logits.double()
    ref = F.cross_entropy(
        logits[:, :-1].reshape(-1, tok.vocab_size), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    loss = sft_loss(model, ids, mask, labels)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_warm_start_caches_and_second_call_loads_without_training(tmp_path, monkeypatch):
    task, tok = ArithmeticTask(digits=1), CharTokenizer()
    config = tiny_llama_config(tok.vocab_size, hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate=32)
    kwargs = dict(out_dir=tmp_path, steps=3, batch_size=8, lr=1e-3, error_rate=0.5, model_config=config, progress=False)
    threads = torch.get_num_threads()
    first = sft_warm_start(task, tok, **kwargs)
    assert not first.training and torch.get_num_threads() == threads
    assert not torch.equal(first.lm_head.weight, build_tiny_model(config, seed=0).lm_head.weight)
    assert (tmp_path / "model.safetensors").is_file() and CharTokenizer.load(tmp_path) == tok

    def no_training(*args, **kw):
        raise AssertionError("trained again although the cache matches")

    monkeypatch.setattr(warm_start, "_train", no_training)
    second = sft_warm_start(task, tok, **kwargs)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(AssertionError, match="trained again"):
        sft_warm_start(task, tok, **{**kwargs, "steps": 4})


def test_warm_start_validates_arguments(tmp_path):
    task, tok = ArithmeticTask(digits=1), CharTokenizer()
    with pytest.raises(ValueError, match="steps"):
        sft_warm_start(task, tok, out_dir=tmp_path, steps=0)
    with pytest.raises(ValueError, match="error_rate"):
        sft_warm_start(task, tok, out_dir=tmp_path, error_rate=2.0)
    with pytest.raises(ValueError, match="model_config"):
        sft_warm_start(task, tok, out_dir=tmp_path, model_config=tiny_llama_config(5))
    with pytest.raises(ValueError, match="tokenizer"):
        sft_warm_start(task, CharTokenizer("0123456789="), out_dir=tmp_path)


def _greedy_one(model, tok, prompt, max_new_tokens):
    """Greedy decode of one unpadded prompt by full forward passes (no cache, no padding)."""
    ids = tok.encode(prompt)
    for _ in range(max_new_tokens):
        nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        if nxt == tok.eos_id:
            break
    return tok.decode(ids[len(tok.encode(prompt)) :])


def test_batched_left_padded_greedy_matches_one_prompt_at_a_time():
    task, tok = ArithmeticTask(), CharTokenizer()
    model = build_tiny_model(tiny_llama_config(tok.vocab_size, hidden_size=32, intermediate=48), seed=4)
    problems = [Problem("3+4=", "7"), *task.problems(5, "test")]
    texts = complete(model, tok, [p.prompt for p in problems], max_new_tokens=4)
    assert texts == [_greedy_one(model, tok, p.prompt, 4) for p in problems]
    expected = sum(task.score(p, t) for p, t in zip(problems, texts)) / len(problems)
    assert greedy_accuracy(model, tok, task, problems, 4) == expected
