"""A tiny semi-online DPO run (s = 2, a checkpoint every step) that can SIGKILL itself at a named phase.

``run(out_dir, steps, fault, resume)`` runs in a fresh process (the fault tests start it through a
``forkserver`` that has imported torch and hotloop once, so each child costs a fork, not an import).
``fault = "<phase>@<step>"`` installs, from here and not from library code, a hook that sends
SIGKILL to this process at that point of loop step ``<step>``:

- ``sampling``: inside ``engine.generate``; ``scoring``: inside the reward function;
- ``training``: inside the optimizer step (gradients computed, weights not yet updated);
- ``ckpt-write``: half-way through writing ``engine.safetensors`` of the checkpoint after the step;
- ``ckpt-between``: after ``trainer.pt``/``.json`` are written, before ``rng.*``;
- ``ckpt-latest``: after the checkpoint directory is in place, before ``latest`` is rewritten.

Without a fault nothing is patched, and the run is the uninterrupted reference.
"""

import os
import signal

import torch

from hotloop.runtime import checkpoint, checkpoint_files
from tests.runtime.tiny_loop import make_loop, random_reward

PHASES = ("sampling", "scoring", "training", "ckpt-write", "ckpt-between", "ckpt-latest")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def run(out_dir: str, steps: int, fault: str | None, resume: bool) -> None:
    torch.set_num_threads(1)  # the same reduction order in every child
    torch.manual_seed(0)  # random_reward's stream (a resumed run restores it from the checkpoint)
    loop = make_loop(out_dir, sync_every=2, steps=steps, reward=random_reward, lr=1e-2, checkpoint_every=1)
    if fault:
        phase, step = fault.split("@")
        _install(loop, phase, int(step))
    loop.run(resume=resume)


def _install(loop, phase: str, at: int) -> None:
    """Patch the pieces of ``loop`` (in this process only) so that ``phase`` of step ``at`` dies."""
    now = {"step": -1}
    loop_step = loop.step
    loop.step = lambda step: (now.update(step=step), loop_step(step))[1]
    here = lambda: now["step"] == at  # noqa: E731
    if phase == "sampling":
        generate = loop.engine.generate
        loop.engine.generate = lambda *a, **k: die() if here() else generate(*a, **k)
    elif phase == "scoring":
        reward = loop.reward_fn
        loop.reward_fn = lambda p, t: die() if here() else reward(p, t)
    elif phase == "training":
        loop.trainer.optimizer.register_step_pre_hook(lambda *a: die() if here() else None)
    elif phase == "ckpt-write":
        save = checkpoint_files.save_weights

        def torn(state, file):
            save(state, file)
            if here() and file.name == "engine.safetensors":
                os.truncate(file, file.stat().st_size // 2)
                die()

        checkpoint_files.save_weights = torn
    elif phase == "ckpt-between":
        write = checkpoint_files.write_state
        checkpoint_files.write_state = lambda out, name, state: (
            die() if here() and name == "rng" else write(out, name, state)
        )
    elif phase == "ckpt-latest":
        latest = checkpoint._write_latest
        checkpoint._write_latest = lambda run_dir, name: die() if here() else latest(run_dir, name)
    else:
        raise ValueError(f"fault: expected a phase in {PHASES}, got {phase!r}")
