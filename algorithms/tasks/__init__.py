"""Built-in tasks (verifiable arithmetic, a style-preference task), their tokenizer and tiny model."""

from hotloop.algorithms.tasks.arithmetic import ArithmeticTask, Problem
from hotloop.algorithms.tasks.preference import PreferenceTask
from hotloop.algorithms.tasks.tiny_model import build_tiny_model, tiny_llama_config
from hotloop.algorithms.tasks.tokenizer import CharTokenizer
from hotloop.algorithms.tasks.warm_start import complete, greedy_accuracy, sampled_accuracy, sft_warm_start

__all__ = [
    "ArithmeticTask",
    "CharTokenizer",
    "PreferenceTask",
    "Problem",
    "build_tiny_model",
    "complete",
    "greedy_accuracy",
    "sampled_accuracy",
    "sft_warm_start",
    "tiny_llama_config",
]
