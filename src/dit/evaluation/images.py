"""Sample grids and PNGs."""

import os
from pathlib import Path

import numpy as np
import torch


def make_grid(images, nrow, pad=1):
    """(N, C, H, W) in [0, 1] -> (C, rows·(H+pad)+pad, nrow·(W+pad)+pad), black gutters."""
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    grid = torch.zeros(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for k in range(n):
        r, col = divmod(k, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = (
            images[k].cpu()
        )
    return grid


def save_png(image, path, upscale=None):
    """Write a (C, H, W) [0, 1] image (C = 1 or 3) as a PNG; small images are upscaled for eyes."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array[..., :3])
    if upscale is None:
        upscale = max(1, 256 // max(img.size))
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    img.save(path)
    return path


def save_npz(path, **arrays):
    """np.savez under a temporary name, then renamed: a full disk or a killed run never leaves a
    truncated .npz that looks like a finished one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object: np.savez appends no second ".npz"
        np.savez(f, **arrays)
    os.replace(tmp, path)
