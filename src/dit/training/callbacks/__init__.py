"""Callbacks of a training run, one file each (conf/callbacks/ names them)."""
