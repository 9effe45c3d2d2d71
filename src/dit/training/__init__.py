"""Training: the LightningModule, its callbacks, checkpoints, run folders and their manifests."""
