"""hotloop: kernel-level toolkit for cheap fully-online LLM alignment.

The repository root is this package (see ``pyproject.toml``'s ``package-dir``):

- ``hotloop.kernels``    fused linear log-prob, fused alignment losses, KL; Triton on CUDA, exact CPU path.
- ``hotloop.runtime``    colocated rollout engine, trainer, checkpoints, the online loop.
- ``hotloop.algorithms`` offline / semi-online / online DPO and friends, GRPO, rewards, tasks, CLI.
"""

__version__ = "0.1.0"
