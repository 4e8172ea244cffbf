"""Child process of ``test_kill_resume.py``: a semi-online DPO loop (s = 2) on the tiny Llama that
checkpoints every step.

Usage: ``python -m tests.runtime.kill_resume_child OUT_DIR STEPS PAUSE_AT [--resume]``.
While scoring step PAUSE_AT (-1: never) it prints ``paused`` and blocks on a line from stdin, so the
parent can signal it at a known point without sleeping. Exit status: 0 when the run finished, 130
when SIGINT/SIGTERM stopped it early (as the ``hotloop`` CLI).
"""

import sys

import torch

from tests.runtime.tiny_loop import make_loop, random_reward


def main(out_dir: str, steps: int, pause_at: int, resume: bool) -> int:
    torch.set_num_threads(1)  # the same reduction order in every child
    torch.manual_seed(0)  # random_reward's stream (a resumed run restores it from the checkpoint)
    scored = []

    def reward(problems, texts):
        if len(scored) == pause_at:
            print("paused", flush=True)
            sys.stdin.readline()
        scored.append(1)
        return random_reward(problems, texts)

    loop = make_loop(out_dir, sync_every=2, steps=steps, reward=reward, lr=1e-2, checkpoint_every=1)
    result = loop.run(resume=resume)
    return 130 if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), "--resume" in sys.argv[4:]))
