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
