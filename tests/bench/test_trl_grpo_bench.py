"""The TRL comparison's arithmetic on recorded steps (running either side needs the real model: bench/trl_grpo.py):
step 1 is left out, the median of the later steps is reported, per-row time is training time over trained rows."""

from bench import trl_grpo


def test_row_reports_the_median_of_the_later_steps_and_seconds_per_trained_row():
    args = trl_grpo.parse_args(["--prompts", "2", "--samples", "4", "--max-new-tokens", "16"])
    steps = [
        dict(step_s=90.0, generate_s=50.0, train_s=40.0, rows=8),  # first step: one-time work, left out
        dict(step_s=10.0, generate_s=6.0, train_s=4.0, rows=8),
        dict(step_s=14.0, generate_s=8.0, train_s=6.0, rows=0),
        dict(step_s=12.0, generate_s=7.0, train_s=5.0, rows=4),
    ]
    row = trl_grpo._row("hotloop", steps, 1234.0, args)
    assert row.median_ms == 12000.0 and row.peak_extra_mb == 1234.0
    assert row.size == "2 prompts x 4 samples x 16 tokens"
    assert "sampling 7.0 s, training 5.0 s" in row.note
    assert "4 rows trained per step" in row.note and "1.25 s per trained row" in row.note  # 15 s / 12 rows


def test_row_says_when_no_row_was_trained():
    args = trl_grpo.parse_args([])
    steps = [dict(step_s=1.0, generate_s=1.0, train_s=0.0, rows=0)] * 2
    assert trl_grpo._row("hotloop", steps, 1.0, args).note.startswith("no rows trained")


def test_both_sides_recompute_the_layers_unless_told_not_to(tmp_path):
    """hotloop's ``--set`` values load on the example and carry the flag TRL's ``GRPOConfig`` gets."""
    from hotloop.algorithms.loader import load_config

    for argv, expected in (([], True), (["--no-gradient-checkpointing"], False)):
        args = trl_grpo.parse_args(["--steps", "3", *argv])
        config = load_config(trl_grpo.EXAMPLE, trl_grpo.hotloop_settings(args, tmp_path))
        assert args.gradient_checkpointing is expected
        assert config.trainer.gradient_checkpointing is expected
        assert (config.loop.steps, config.loop.eval_every, config.loop.final_checkpoint) == (3, 0, False)
