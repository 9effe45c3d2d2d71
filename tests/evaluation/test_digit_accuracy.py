"""The digits check that ends a quickstart run (dit.evaluation.digit_accuracy): its progress bar, on a
stand-in for the run and a tiny untrained DiT (tests/test_train.py's quickstart test checks its accuracy)."""

from conftest import bars, stand_in_run

from dit.diffusion.samplers import DDIM
from dit.evaluation.digit_accuracy import DigitAccuracy


def test_digit_accuracy_shows_a_bar_of_its_sampling_on_rank_0(tmp_path, capsys):
    """One batch of 10 × 2 guided samples: a bar of the sampler's 5 steps, on rank 0 (which alone
    draws them) where Lightning shows its bar; the summary line stays."""
    callback = DigitAccuracy(DDIM("ddim5"), samples_per_class=2)
    for rank, refresh_rate, expected in [(0, 20, ["5/5"]), (1, 20, []), (0, 0, [])]:
        callback.on_train_end(*stand_in_run(rank, refresh_rate=refresh_rate, root=tmp_path))
        out, err = capsys.readouterr()
        assert bars(err, "digits: 20 guided samples") == expected, (rank, refresh_rate)
        assert ("guided samples (scale 4.0" in out) == (rank == 0)


def test_a_run_stopped_early_skips_the_check(tmp_path, capsys):
    """A preemption signal or the non-finite guard stops a run before trainer.max_steps: no minutes of
    sampling after the checkpoint is saved, and no share that would describe an unfinished model."""
    callback = DigitAccuracy(DDIM("ddim5"), samples_per_class=2)
    trainer, module = stand_in_run(root=tmp_path)
    trainer.max_steps, trainer.global_step = 10, 4
    callback.on_train_end(trainer, module)
    out, err = capsys.readouterr()
    assert "the accuracy check is skipped: the run stopped at step 4 of 10" in out and "guided samples" not in out
    assert callback.accuracy is None
    trainer.global_step = 10  # finished: checked
    callback.on_train_end(trainer, module)
    assert "guided samples (scale 4.0" in capsys.readouterr().out and callback.accuracy is not None
