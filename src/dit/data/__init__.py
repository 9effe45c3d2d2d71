"""Latent shards and the LightningDataModule that streams them, the bundled digits, the VAE."""
