"""From what a sampler draws to images: one decoder per kind of data, chosen once from what the
data are (the data config's `pixels`), not guessed at each use.

- `PixelDecoder`: the "latents" are images in [-1, 1] (the digits): divided by the scale factor.
- `VAEDecoder`: VAE latents, decoded by the Stable Diffusion VAE (paper §3.1), 8× the resolution.
- `LatentPreview`: VAE latents where no VAE is loaded (training's sample grids): their first 3
  channels, each sample scaled to [-1, 1]; a glance at the layout, not an image.
"""

from __future__ import annotations

import torch

from dit.data.vae import SCALE_FACTOR, decode, load_vae


class PixelDecoder:
    upsampling = 1

    def __init__(self, scale_factor: float = 1.0):
        self.scale_factor = scale_factor

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return z.float() / self.scale_factor


class VAEDecoder:
    upsampling = 8  # the SD VAE's 8× (paper §3.1: 256×256×3 ↔ 32×32×4)

    def __init__(self, vae, scale_factor: float = SCALE_FACTOR):
        self.vae, self.scale_factor = vae, scale_factor

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return decode(self.vae, z.float(), self.scale_factor)


class LatentPreview:
    upsampling = 1

    def __init__(self, scale_factor: float = SCALE_FACTOR):
        self.scale_factor = scale_factor

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        z = z[:, :3].float() / self.scale_factor
        return z / z.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)


def data_are_pixels(data_config: dict | None, channels: int | None = None) -> bool:
    """Whether a model's data are pixels: its data config's `pixels`; for a config written before
    the key existed, 1 or 3 channels at scale factor 1; with no config at all (a bare state dict,
    the official checkpoint), 1 or 3 `channels`."""
    if data_config is None:
        return channels in (1, 3)
    if "pixels" in data_config:
        return bool(data_config["pixels"])
    return data_config.get("channels") in (1, 3) and data_config.get("scale_factor") == 1.0


def make_decoder(pixels: bool, scale_factor: float, vae=None, device: torch.device | str = "cpu"):
    """The decoder of the data: pixels as they are; latents through `vae` (an AutoencoderKL, or a
    name for `load_vae`: "ema", "mse", a folder), or, with vae=None, as a preview."""
    if pixels:
        return PixelDecoder(scale_factor)
    if vae is None:
        return LatentPreview(scale_factor)
    return VAEDecoder(load_vae(vae, device) if isinstance(vae, str) else vae, scale_factor)
