"""Progress bars of the long steps (tqdm, on stderr), by one rule:

- work every rank does (drawing samples in dit.sample, encoding images in dit.extract): one bar per
  rank, labelled `rank N`, at `position=rank` so that the ranks' bars stack instead of overwriting
  each other;
- work one process does (FID features and reference statistics in dit.fid, the .npz of samples):
  a single bar, from that process only (global rank 0; dit.extract's merge: the rank that merges);
- inside a training run (the FID monitor, the digits check): Lightning shows its bar on global rank
  0 only, so these bars show only where Lightning's does (`shown_in_training`), as a single bar of
  all ranks' work; one drawn while the training bar is live has `leave=False`, so it does not break it.
"""


def shown_in_training(trainer) -> bool:
    """Whether the run's progress bar shows on this process: a run has one
    (conf/callbacks/progress_bar.yaml), it is not turned off (refresh_rate=0, as the tests run), and
    this is global rank 0 (Lightning disables it on the others)."""
    bar = trainer.progress_bar_callback
    return bar is not None and getattr(bar, "is_enabled", True)
