"""Reward sources: verifiers, reward models, rule-based scores, LLM judges and their mixtures."""

from hotloop.algorithms.rewards.base import RewardFn
from hotloop.algorithms.rewards.judge import JudgeConfig, LLMJudge
from hotloop.algorithms.rewards.mixture import WeightedMixture
from hotloop.algorithms.rewards.reward_model import RuleBasedReward, SequenceClassifierReward
from hotloop.algorithms.rewards.style import StyleConfig, StyleReward
from hotloop.algorithms.rewards.verifiers import ExactMatchReward, MathVerifyReward

__all__ = [
    "ExactMatchReward",
    "JudgeConfig",
    "LLMJudge",
    "MathVerifyReward",
    "RewardFn",
    "RuleBasedReward",
    "SequenceClassifierReward",
    "StyleConfig",
    "StyleReward",
    "WeightedMixture",
]
