"""Alignment algorithms on hotloop's kernels and runtime.

Each algorithm is a small class implementing :class:`hotloop.algorithms.base.Algorithm`
(scored samples → ``Batch`` → ``LossOutput``); ``hotloop.algorithms.config.ALGORITHMS`` names
them for the ``hotloop`` CLI. Submodules are imported explicitly (``from hotloop.algorithms.dpo
import OnlineDPO``) so that importing the package stays cheap.
"""
