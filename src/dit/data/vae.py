"""The Stable Diffusion VAE that DiT works in (paper §3.1: 256×256×3 images ↔ 4×32×32 latents).

Latents are multiplied by 0.18215 (SD's scale factor, as the official code) so that they have about
unit variance; `decode` divides it out. The weights are downloaded from the Hugging Face hub on
first use; offline, `load_vae` says so and takes a local folder instead.
"""

import torch

from dit.errors import UsageError

SCALE_FACTOR = 0.18215
VAES = {
    "ema": "stabilityai/sd-vae-ft-ema",
    "mse": "stabilityai/sd-vae-ft-mse",
}  # paper §4: ft-EMA headline, ft-MSE Table 4


def load_vae(name: str = "ema", device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """`name`: "ema", "mse", a hub id, or a local folder holding an `AutoencoderKL` (config.json + weights)."""
    from diffusers.models import AutoencoderKL

    source = VAES.get(name, name)
    try:
        vae = AutoencoderKL.from_pretrained(source, torch_dtype=dtype)
    except (OSError, ValueError) as error:  # no network, no such repo, or a folder that is not a VAE
        raise UsageError(
            f"could not load the VAE {source!r}: {str(error).splitlines()[0]}. "
            f"Offline? Download it where there is a network (`hf download {source} --local-dir sd-vae`), copy "
            f"the folder here and pass its path instead of {name!r} (e.g. --vae /path/to/sd-vae)"
        ) from None
    return vae.to(device).eval().requires_grad_(False)


def tiny_vae(seed=0):
    """A randomly initialised `AutoencoderKL` of the SD layout (4 latent channels, 8× down), small
    enough for tests: the same class and code path as the real one."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1], (N, 3, H, W) → posterior (mean, std) of the unscaled latents, float32."""
    dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


@torch.no_grad()
def decode(vae, latents: torch.Tensor, scale_factor: float = SCALE_FACTOR) -> torch.Tensor:
    """Scaled latents (what DiT is trained on) → images in [-1, 1], float32."""
    return vae.decode((latents / scale_factor).to(vae.device, vae.dtype)).sample.float()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images (N, C, H, W) → uint8 (N, H, W, C), rounded as the official sample_ddp.py."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
