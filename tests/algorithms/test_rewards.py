"""Tests for the reward sources on real (tiny, randomly initialised) transformers models."""

import math
import random
import threading

import pytest
import torch
from transformers import LlamaForSequenceClassification

from hotloop.algorithms.rewards import (
    ExactMatchReward,
    LLMJudge,
    MathVerifyReward,
    RewardFn,
    RuleBasedReward,
    SequenceClassifierReward,
    StyleConfig,
    StyleReward,
    WeightedMixture,
)
from hotloop.algorithms.tasks import (
    ArithmeticTask,
    CharTokenizer,
    PreferenceTask,
    Problem,
    build_tiny_model,
    tiny_llama_config,
)

LETTERS = "abcdefghijklmnopqrstuvwxyzABIQW0123456789+-=?:. \n"


def _classifier(num_labels: int, vocab_size: int, seed: int = 0) -> LlamaForSequenceClassification:
    config = tiny_llama_config(vocab_size, hidden_size=32, layers=1, heads=4, kv_heads=2, intermediate=48)
    config.num_labels = num_labels
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config).eval()


def _arith_batch():
    return ([Problem("12+39=", "51"), Problem("7+8=", "15"), Problem("40+2=", "42")], ["51", "16", " 42 "])


def test_every_reward_source_satisfies_the_protocol():
    tok = CharTokenizer()
    model = build_tiny_model(tiny_llama_config(tok.vocab_size, hidden_size=16, heads=2, kv_heads=1), seed=0)
    sources = [
        ExactMatchReward(ArithmeticTask()),
        MathVerifyReward(),
        RuleBasedReward(PreferenceTask().score),
        SequenceClassifierReward(_classifier(1, tok.vocab_size), tok),
        LLMJudge(model, tok),
        StyleReward(),
    ]
    for source in sources:
        assert isinstance(source, RewardFn)


def test_exact_match_reward_uses_task_score():
    problems, completions = _arith_batch()
    out = ExactMatchReward(ArithmeticTask())(problems, completions)
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    "gold, completion, expected",
    [
        ("\\frac12", "\\boxed{\\dfrac{1}{2}}", 1.0),
        ("$\\frac{1}{2}$", "The answer is $0.5$.", 1.0),
        ("$x^2+2x+1$", "so we get $(x+1)^2$", 1.0),
        ("\\sqrt{2}", "$\\boxed{\\sqrt{3}}$", 0.0),
        ("51", "51", 1.0),
        ("51", "The answer is \\boxed{52}", 0.0),
        ("3", "no number here", 0.0),
    ],
)
def test_math_verify_reward_compares_values_not_strings(gold, completion, expected):
    assert MathVerifyReward()([Problem("q", gold)], [completion]).tolist() == [expected]


def test_math_verify_reward_works_outside_the_main_thread():
    out = {}
    thread = threading.Thread(target=lambda: out.update(r=MathVerifyReward()([Problem("q", "1/2")], ["$0.5$"])))
    thread.start()
    thread.join()
    assert out["r"].tolist() == [1.0]


def test_sequence_classifier_reward_matches_one_sequence_at_a_time():
    tok = CharTokenizer()
    model = _classifier(1, tok.vocab_size)
    problems = [
        Problem("12+39=", ""),
        Problem("1+1=", ""),
        Problem("98+7=", ""),
        Problem("5+5=", ""),
        Problem("60+31=", ""),
    ]
    completions = ["51", "2222222", "", "10", "91"]
    out = SequenceClassifierReward(model, tok, batch_size=2)(problems, completions)
    with torch.no_grad():
        ref = torch.stack(
            [model(torch.tensor([tok.encode(p.prompt + c)])).logits[0, 0] for p, c in zip(problems, completions)]
        )
    assert out.shape == (5,) and out.dtype == torch.float32
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert out.std() > 0


def test_sequence_classifier_reward_reads_the_requested_label():
    tok = CharTokenizer()
    model = _classifier(3, tok.vocab_size, seed=1)
    problems, completions = _arith_batch()
    with torch.no_grad():
        ids = torch.tensor([tok.encode(problems[0].prompt + completions[0])])
        ref = model(ids).logits[0]
    assert SequenceClassifierReward(model, tok, label=2)(problems[:1], completions[:1]).item() == pytest.approx(
        ref[2].item(), rel=1e-5
    )
    with pytest.raises(ValueError, match="label"):
        SequenceClassifierReward(model, tok, label=3)
    with pytest.raises(TypeError, match="model"):
        SequenceClassifierReward(build_tiny_model(tiny_llama_config(tok.vocab_size)), tok)


def test_rule_based_reward_scores_the_preference_task():
    task = PreferenceTask(target_length=4)
    problems = [Problem("71=", ""), Problem("3=", "")]
    out = RuleBasedReward(task.score)(problems, ["7123", "4"])
    assert out.tolist() == pytest.approx([1.0, (1 + 0.25 + 0) / 3])
    with pytest.raises(TypeError, match="fn"):
        RuleBasedReward(3)


def test_style_reward_grades_format_and_length_and_optionally_the_lead_character():
    problems = [Problem("71=", "")] * 5
    texts = ["123", "12 3", "1234567", "", "7xy"]
    plain = StyleReward(StyleConfig(target_length=3))(problems, texts)
    assert plain.dtype == torch.float32
    assert plain.tolist() == pytest.approx([1.0, (3 / 4 + 2 / 3) / 2, (1 + 0) / 2, 0.0, (1 / 3 + 1) / 2])
    lead = StyleReward(StyleConfig(target_length=3, lead=True))(problems, texts)
    assert lead.tolist() == pytest.approx([2 / 3, (3 / 4 + 2 / 3) / 3, 1 / 3, 0.0, (1 / 3 + 1 + 1) / 3])


def test_style_reward_stays_in_unit_interval_on_random_text():
    rng = random.Random(0)
    reward = StyleReward(StyleConfig(target_length=4, charset="ab", lead=True))
    texts = ["".join(rng.choice("abc ") for _ in range(rng.randrange(12))) for _ in range(200)]
    out = reward([Problem("a?", "")] * len(texts), texts)
    assert bool(((out >= 0) & (out <= 1)).all()) and out.max() == 1.0


def test_preference_task_is_scored_by_the_style_reward_model():
    task = PreferenceTask(target_length=5)
    assert isinstance(task.reward_model, StyleReward)
    assert task.reward_model.config == StyleConfig(target_length=5, charset="0123456789", lead=True)


@pytest.mark.parametrize(
    "kwargs, field", [({"target_length": 0}, "target_length"), ({"charset": ""}, "charset"), ({"lead": "yes"}, "lead")]
)
def test_style_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        StyleConfig(**kwargs)


def _judge(seed=0, **kw):
    tok = CharTokenizer(LETTERS)
    model = build_tiny_model(
        tiny_llama_config(tok.vocab_size, hidden_size=32, intermediate=48, max_position=128), seed=seed
    ).eval()
    return LLMJudge(model, tok, **kw), model, tok


def _logprob_of(model, tok, context, continuation):
    ids = tok.encode(context + continuation)
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    start = len(tok.encode(context))
    return sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))


def test_judge_continuation_logprob_matches_a_full_forward_pass():
    judge, model, tok = _judge(batch_size=2)
    contexts = ["Q: 1+1=? A:", "Q: 12+39=?", "x"]
    continuations = [" yes", " no", " AB"]
    out = judge.continuation_logprob(contexts, continuations)
    ref = [_logprob_of(model, tok, c, y) for c, y in zip(contexts, continuations)]
    assert out.tolist() == pytest.approx(ref, rel=1e-5)


def test_judge_preference_is_position_debiased_and_follows_choice_logprobs():
    judge, model, tok = _judge(seed=3)
    p, a, b = Problem("12+39=", "51"), "51", "41"
    prob = judge.prefer(p, a, b)
    assert 0.0 < prob < 1.0
    assert prob + judge.prefer(p, b, a) == pytest.approx(1.0, abs=1e-6)

    def sig_gap(x, y):
        ctx = judge.template.format(prompt=p.prompt, a=x, b=y)
        return 1 / (1 + math.exp(-(_logprob_of(model, tok, ctx, " A") - _logprob_of(model, tok, ctx, " B"))))

    assert prob == pytest.approx(0.5 * (sig_gap(a, b) + 1 - sig_gap(b, a)), rel=1e-5)


def test_judge_pointwise_reward_is_sigmoid_of_yes_minus_no():
    judge, model, tok = _judge(seed=5)
    problems, completions = _arith_batch()
    out = judge(problems, completions)
    ref = []
    for p, c in zip(problems, completions):
        ctx = judge.pointwise_template.format(prompt=p.prompt, completion=c)
        ref.append(1 / (1 + math.exp(-(_logprob_of(model, tok, ctx, " yes") - _logprob_of(model, tok, ctx, " no")))))
    assert out.dtype == torch.float32 and out.tolist() == pytest.approx(ref, rel=1e-5)


def test_judge_validates_templates_and_choices():
    judge, model, tok = _judge()
    with pytest.raises(ValueError, match="template"):
        LLMJudge(model, tok, template="{prompt} {a}")
    with pytest.raises(ValueError, match="choices"):
        LLMJudge(model, tok, choices=(" A", " A"))


def test_mixture_is_the_weighted_sum_of_its_sources():
    problems, completions = _arith_batch()
    exact = ExactMatchReward(ArithmeticTask())
    length = RuleBasedReward(lambda p, c: len(c))
    out = WeightedMixture([(exact, 0.7), (length, 0.25)])(problems, completions)
    assert out.tolist() == pytest.approx(
        (0.7 * exact(problems, completions) + 0.25 * torch.tensor([2.0, 2.0, 4.0])).tolist()
    )


@pytest.mark.parametrize(
    "components, error, match",
    [
        ([], ValueError, "at least one"),
        ([(len, -1.0)], ValueError, "weight"),
        ([(len, float("nan"))], ValueError, "weight"),
        ([(len, 0.0), (len, 0)], ValueError, "positive weight"),
        ([("not callable", 1.0)], TypeError, "callable"),
        ([len], TypeError, "tuple"),
    ],
)
def test_mixture_rejects_bad_weights_and_sources(components, error, match):
    with pytest.raises(error, match=match):
        WeightedMixture(components)


def test_rewards_reject_mismatched_batches_and_wrong_shapes():
    problems, completions = _arith_batch()
    with pytest.raises(ValueError, match="completions"):
        ExactMatchReward(ArithmeticTask())(problems, completions[:2])
    with pytest.raises(TypeError, match="completions"):
        MathVerifyReward()(problems[:1], [51])
    with pytest.raises(ValueError, match="shape"):
        WeightedMixture([(lambda p, c: torch.zeros(len(p) + 1), 1.0)])(problems, completions)
