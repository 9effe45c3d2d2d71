"""The torch_xla branches of the model and the samplers: Pallas flash attention on a TPU and a
graph boundary per sampling step. torch_xla is imported only on an XLA device."""

import warnings

import torch


def on_tpu(tensor: torch.Tensor) -> bool:
    """Whether torch_xla's Pallas kernels can run on this tensor; says once when they cannot."""
    if tensor.device.type == "xla":
        import torch_xla.runtime

        if torch_xla.runtime.device_type() == "TPU":
            return True
    if tensor.device.type != "meta" and not getattr(on_tpu, "warned", False):  # meta: a shape-only pass
        on_tpu.warned = True
        warnings.warn(
            f"attention=xla_flash needs a TPU (this is {tensor.device}); using scaled_dot_product_attention",
            stacklevel=2,
        )
    return False


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch_xla's Pallas flash-attention kernel, at SDPA's scale 1/√head_dim (the kernel's default is 1)."""
    from torch_xla.experimental.custom_kernel import flash_attention as pallas_flash_attention

    return pallas_flash_attention(q, k, v, sm_scale=q.shape[-1] ** -0.5)


def end_step(x: torch.Tensor) -> None:
    """On XLA, cut the lazy graph after a sampling step: one graph per step, compiled once and
    reused, rather than one graph of all steps. A no-op elsewhere."""
    if x.device.type == "xla":
        import torch_xla

        torch_xla.sync()
