"""Commands around training: latent extraction, exports, the benchmark."""
