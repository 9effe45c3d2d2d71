"""Frozen vision encoders whose patch tokens REPA aligns DiT's hidden states to (Yu et al. 2024,
"Representation Alignment for Generation"; code: sihyun-yu/REPA).

REPA's default target is DINOv2 ViT-B/14 (its train.py `--enc-type dinov2-vit-b`): the final-norm
patch tokens (`x_norm_patchtokens` of the DINOv2 hub model, without the class token) of the training
image. The image is prepared as REPA's train.py `preprocess_raw_image` does for DINOv2: uint8 / 255,
ImageNet mean/std, then a bicubic resize to 224 px (16×16 = 256 patches of 14 px, one per token of
DiT-XL/2 on 32×32 latents). REPA's train.py trains at 256 px only; the code built on it for 512 px
(its `preprocess_raw_image` with 224·(resolution // 256), e.g. in REG) resizes to 448 px, 32×32
patches. Here the rule is written as `patch · resolution / 16`: the same at 256 and 512, and a token
grid of resolution / 16 for any multiple of 16 (the tests' 32-px images: 2×2 tokens).

The weights are timm's copies of Meta's DINOv2 checkpoints (the `.lvd142m` models on the Hugging
Face hub), built at that input size; timm resamples the 37×37 position embedding of the 518-px
checkpoints to the grid with anti-aliased bicubic interpolation, as REPA's utils.py `load_encoders`
does with timm's `resample_abs_pos_embed` on the torch.hub model. `pretrained=False` builds the same
class with a seeded random initialisation (tests: no weights can be downloaded there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dit.errors import UsageError

# timm.data's IMAGENET_DEFAULT_MEAN / _STD, which REPA train.py normalises DINOv2's input with; written
# out so that importing this module (dit.extract does) does not import timm (seconds) until an encoder is built
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderSpec:
    timm_name: str  # timm model name (with its pretrained tag) of the same network as the torch.hub model
    dim: int  # feature width D of a patch token
    patch: int  # patch side in pixels of the encoder's input
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN  # REPA train.py: Normalize(IMAGENET_DEFAULT_MEAN, ...)
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD

    @property
    def hub_id(self) -> str:
        return "timm/" + self.timm_name


# REPA's `--enc-type dinov2-vit-{s,b,l}` (utils.py load_encoders: torch.hub dinov2_vit{s,b,l}14); B is its default.
ENCODERS = {
    "dinov2_vits14": EncoderSpec("vit_small_patch14_dinov2.lvd142m", dim=384, patch=14),
    "dinov2_vitb14": EncoderSpec("vit_base_patch14_dinov2.lvd142m", dim=768, patch=14),
    "dinov2_vitl14": EncoderSpec("vit_large_patch14_dinov2.lvd142m", dim=1024, patch=14),
}
RANDOM_INIT_SEED = 0  # a random encoder is the same in every process: tests compare shards with one built by hand


def encoder_input_size(resolution: int, patch: int = 14) -> int:
    """The side the encoder sees for images of side `resolution`: 224 px at 256 (REPA train.py),
    448 at 512 (224·(resolution // 256) of its 512-px derivatives) for a /14 encoder, i.e. a token
    grid of resolution / 16."""
    if resolution <= 0 or resolution % 16:
        raise UsageError(
            f"resolution {resolution} is not a positive multiple of 16: REPA's encoder grid is resolution/16 tokens "
            "a side (224 px for 256-px images); use a multiple of 16 (--resolution)"
        )
    return patch * resolution // 16


class Encoder(torch.nn.Module):
    """A frozen encoder: `features(images)` gives the (N, T, D) float32 patch tokens of
    (N, 3, resolution, resolution) images, uint8 in [0, 255] or float in [0, 1]. It stays in eval
    mode (`train()` is a no-op) and holds no gradients."""

    def __init__(self, name: str, spec: EncoderSpec, model: torch.nn.Module, resolution: int, input_size: int):
        super().__init__()
        self.name, self.spec, self.model = name, spec, model
        self.resolution, self.input_size = resolution, input_size
        self.grid = input_size // spec.patch
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    @property
    def tokens(self) -> int:
        return self.grid * self.grid

    @property
    def dim(self) -> int:
        return self.spec.dim

    def train(self, mode: bool = True) -> Encoder:
        # a frozen target (REPA train.py runs it in eval mode, under no_grad): a LightningModule holding
        # it would put its children in train mode at each epoch
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """REPA train.py `preprocess_raw_image` for DINOv2: /255, ImageNet mean/std, bicubic resize
        (F.interpolate's defaults: align_corners=False, no anti-aliasing), in float32."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.resolution, self.resolution):
            raise UsageError(
                f"the encoder {self.name} takes (N, 3, {self.resolution}, {self.resolution}) images, got "
                f"{tuple(images.shape)}; load it with resolution={images.shape[-1]} for other sizes"
            )
        x = images.to(self.mean.device)
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        x = (x - self.mean) / self.std
        return F.interpolate(x, size=self.input_size, mode="bicubic")

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images → (N, T, D) float32 final-norm patch tokens, in row-major grid order
        (token r·grid + c is the patch of row r, column c), without the class token: DINOv2's
        `x_norm_patchtokens`, which REPA train.py aligns to (timm's `forward_features` ends in the
        same final norm; its first `num_prefix_tokens` outputs are the class token)."""
        x = self.preprocess(images).to(self.model_dtype)
        tokens = self.model.forward_features(x)[:, self.model.num_prefix_tokens :]
        return tokens.float()

    @property
    def model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def load_encoder(
    name: str = "dinov2_vitb14",
    pretrained: bool = True,
    device: torch.device | str = "cpu",
    resolution: int = 256,
    weights: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> Encoder:
    """The frozen encoder `name` (a key of ENCODERS) for images of side `resolution`.

    `pretrained`: timm's DINOv2 weights from the Hugging Face hub (or its cache: HF_HUB_OFFLINE=1
    uses the cache alone). `weights`: a local file instead — a `.safetensors` or `.pth` state dict
    of the same timm model (timm's hub file `model.safetensors`) or Meta's own DINOv2 checkpoint
    (`dinov2_vitb14_pretrain.pth`, which timm converts). `pretrained=False` without `weights`: the
    same class, randomly initialised with a fixed seed (for tests only)."""
    if name not in ENCODERS:
        raise UsageError(f"unknown encoder {name!r}; the supported encoders are {', '.join(ENCODERS)}")
    import timm

    spec = ENCODERS[name]
    input_size = encoder_input_size(resolution, spec.patch)
    kwargs = dict(img_size=input_size, num_classes=0)
    if weights is not None:
        if not Path(weights).is_file():
            raise FileNotFoundError(
                f"the encoder weights {weights} do not exist (weights=..., dit.extract --repa-encoder-weights); "
                "pass a local .safetensors or .pth state dict"
            )
        kwargs["pretrained_cfg_overlay"] = dict(file=str(weights))  # timm's local-file source, same filter
    try:
        if pretrained or weights is not None:
            model = timm.create_model(spec.timm_name, pretrained=True, **kwargs)
        else:
            with torch.random.fork_rng(devices=[]):  # seeded, leaving the caller's RNG untouched
                torch.manual_seed(RANDOM_INIT_SEED)
                model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    except RuntimeError as error:  # load_state_dict: a file of another model
        raise UsageError(
            f"the weights in {weights} do not fit the encoder {name} (timm {spec.timm_name}): "
            f"{str(error).splitlines()[0]}; pass that model's state dict (weights=..., --repa-encoder-weights)"
        ) from None
    except OSError as error:  # offline (huggingface_hub's LocalEntryNotFoundError), HTTP errors, an unreadable file
        if weights is not None:
            raise UsageError(f"could not read the encoder weights {weights}: {str(error).splitlines()[0]}") from None
        raise UsageError(
            f"the weights of the encoder {name} ({spec.hub_id}) could not be downloaded "
            f"({type(error).__name__}); where there is a network run `hf download {spec.hub_id}` "
            "(then HF_HUB_OFFLINE=1 uses the Hugging Face cache), or pass the file: weights=PATH "
            "(dit.extract --repa-encoder-weights PATH)"
        ) from None
    model = model.to(device=device, dtype=dtype).eval()
    return Encoder(name, spec, model, resolution, input_size).to(device)
