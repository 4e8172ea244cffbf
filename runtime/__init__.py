"""Runtime: rollout engines colocated with the trainer, the trainer, checkpoints (and the online loop).

``SGLangEngine`` and ``VLLMEngine`` are imported on demand (``make_engine(kind=...)``): they need their packages.
"""

from hotloop.runtime.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from hotloop.runtime.engine import Completion, RolloutEngine, SamplingParams
from hotloop.runtime.engine_factory import make_engine
from hotloop.runtime.loop import LoopResult, OnlineLoop
from hotloop.runtime.loop_config import LoopConfig
from hotloop.runtime.sync_policy import SyncConfig, SyncPolicy
from hotloop.runtime.torch_engine import TorchEngine
from hotloop.runtime.trainer import Trainer, TrainerConfig, make_reference

__all__ = [
    "Completion",
    "LoopConfig",
    "LoopResult",
    "OnlineLoop",
    "RolloutEngine",
    "SamplingParams",
    "SyncConfig",
    "SyncPolicy",
    "TorchEngine",
    "Trainer",
    "TrainerConfig",
    "latest_checkpoint",
    "load_checkpoint",
    "make_engine",
    "make_reference",
    "save_checkpoint",
]
