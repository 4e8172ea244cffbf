"""Runtime: rollout engines colocated with the trainer, the trainer, checkpoints (and the online loop).

``SGLangEngine`` is imported from ``hotloop.runtime.sglang_engine`` on demand (it needs sglang and CUDA).
"""

from hotloop.runtime.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from hotloop.runtime.engine import Completion, RolloutEngine, SamplingParams
from hotloop.runtime.loop import LoopConfig, LoopResult, OnlineLoop, make_engine
from hotloop.runtime.torch_engine import TorchEngine
from hotloop.runtime.trainer import Trainer, TrainerConfig, make_reference

__all__ = [
    "Completion",
    "LoopConfig",
    "LoopResult",
    "OnlineLoop",
    "RolloutEngine",
    "SamplingParams",
    "TorchEngine",
    "Trainer",
    "TrainerConfig",
    "latest_checkpoint",
    "load_checkpoint",
    "make_engine",
    "make_reference",
    "save_checkpoint",
]
