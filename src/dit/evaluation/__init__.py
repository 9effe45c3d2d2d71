"""Sampling from checkpoints, FID, the digits check, plots."""
