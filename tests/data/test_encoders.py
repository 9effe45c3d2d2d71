"""REPA's frozen encoders (dit.data.encoders): DINOv2's patch tokens through timm, REPA's resize and
normalisation, local weight files, and the one-line error offline. Random weights throughout (none
can be downloaded here): the same timm class and code path as the pretrained ones."""

import pytest
import torch
import torch.nn.functional as F

from dit.data.encoders import ENCODERS, encoder_input_size, load_encoder
from dit.errors import UsageError


def repa_preprocess(images, size):
    """REPA train.py preprocess_raw_image for DINOv2, written out: x / 255, ImageNet's mean and std
    (timm's IMAGENET_DEFAULT_*, as numbers here), then F.interpolate(x, size, mode="bicubic")."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return F.interpolate((images.float() / 255.0 - mean) / std, size, mode="bicubic")


@pytest.fixture(scope="module")
def small():
    return load_encoder("dinov2_vits14", pretrained=False)


def test_b14_gives_256_tokens_of_768_for_256px_images():
    """REPA's default target: DINOv2 B/14 at 224 px, 16×16 patch tokens of width 768 (batch 1: a
    ViT-B forward takes ~1 s on one CPU thread)."""
    encoder = load_encoder("dinov2_vitb14", pretrained=False)
    model = encoder.model
    assert (model.patch_embed.patch_size, model.embed_dim, len(model.blocks)) == ((14, 14), 768, 12)
    assert model.patch_embed.grid_size == (16, 16) and model.num_prefix_tokens == 1  # the class token only
    images = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    features = encoder.features(images)
    assert features.shape == (1, 256, 768) and features.dtype == torch.float32
    assert (encoder.tokens, encoder.dim, encoder.input_size) == (256, 768, 224)
    assert ENCODERS["dinov2_vitb14"].dim == 768 and ENCODERS["dinov2_vitb14"].patch == 14


def test_preprocessing_and_tokens_are_repas(small):
    """The resize and normalisation are REPA's (uint8 and [0, 1] floats alike), and the features are
    the final-norm tokens after the class token (DINOv2's x_norm_patchtokens)."""
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x = small.preprocess(images)
    assert x.shape == (2, 3, 224, 224)
    torch.testing.assert_close(x, repa_preprocess(images, 224), rtol=0, atol=1e-5)
    torch.testing.assert_close(small.preprocess(images.float() / 255), x, rtol=0, atol=1e-5)
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # what REPA train.py imports

    assert small.spec.mean == IMAGENET_DEFAULT_MEAN and small.spec.std == IMAGENET_DEFAULT_STD
    # the check tells REPA's resize from its neighbours: anti-aliased or bilinear differ by far more than rounding
    full = repa_preprocess(images, 256)
    for other in (dict(mode="bicubic", antialias=True), dict(mode="bilinear")):
        assert (F.interpolate(full, 224, **other) - x).abs().max() > 0.05, other
    with torch.no_grad():
        normed = small.model.forward_features(x)
    assert normed.shape == (2, 257, 384)
    torch.testing.assert_close(small.features(images), normed[:, 1:], rtol=0, atol=1e-5)
    assert ENCODERS["dinov2_vits14"].dim == small.model.embed_dim == 384


def test_input_size_follows_repa_at_256_and_512():
    assert encoder_input_size(256) == 224 and encoder_input_size(512) == 448  # 224 * (resolution // 256)
    assert encoder_input_size(32) == 28  # the tests' tiny images: a 2×2 grid
    encoder = load_encoder("dinov2_vits14", pretrained=False, resolution=512)
    assert (encoder.input_size, encoder.tokens, encoder.model.patch_embed.grid_size) == (448, 1024, (32, 32))
    with pytest.raises(UsageError, match="resolution 100 is not a positive multiple of 16"):
        load_encoder("dinov2_vits14", pretrained=False, resolution=100)


def test_random_init_is_seeded_frozen_and_leaves_the_rng(small):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    again = load_encoder("dinov2_vits14", pretrained=False)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's draws are untouched
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), again.state_dict().values()))
    assert not any(p.requires_grad for p in again.parameters())
    again.train()  # what a LightningModule does to its children at every epoch
    assert not again.training and not again.model.training


def test_a_local_weights_file_is_resampled_as_repa_does(tmp_path):
    """A state dict of the 518-px checkpoint's shape (37×37 position embedding), as timm's
    .safetensors and as Meta's .pth (with its mask_token): loaded into the 224-px model with the
    position embedding resampled by timm's resample_abs_pos_embed to 16×16, as REPA's utils.py
    load_encoders does to the torch.hub model."""
    import timm
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(7)
    native = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, num_classes=0)
    state = {k: v.contiguous() for k, v in native.state_dict().items()}
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    save_file(state, tmp_path / "model.safetensors")
    torch.save(state | {"mask_token": torch.zeros(1, 384)}, tmp_path / "dinov2_vits14_pretrain.pth")
    for name in ("model.safetensors", "dinov2_vits14_pretrain.pth"):
        encoder = load_encoder("dinov2_vits14", weights=tmp_path / name)
        loaded = encoder.model.state_dict()
        assert torch.equal(loaded["blocks.3.attn.qkv.weight"], state["blocks.3.attn.qkv.weight"])
        torch.testing.assert_close(loaded["pos_embed"], resample_abs_pos_embed(state["pos_embed"], [16, 16]))
    torch.save({k: v for k, v in state.items() if not k.startswith("blocks.11.")}, tmp_path / "other.pth")  # 11 blocks
    with pytest.raises(UsageError, match=r"the weights in .*other.pth do not fit the encoder dinov2_vits14") as error:
        load_encoder("dinov2_vits14", weights=tmp_path / "other.pth")
    assert "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError, match=r"nowhere.pth do not exist \(weights=..., dit.extract"):
        load_encoder("dinov2_vits14", weights=tmp_path / "nowhere.pth")


def test_offline_pretrained_fails_in_one_line(monkeypatch, tmp_path):
    """A real attempt with huggingface_hub offline and an empty cache (what HF_HUB_OFFLINE=1 does on a
    machine without the weights): one line naming the encoder, that its weights could not be
    downloaded, and both fixes."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UsageError) as error:
        load_encoder("dinov2_vits14", pretrained=True)
    message = str(error.value)
    assert "\n" not in message
    for fragment in ("dinov2_vits14", "could not be downloaded", "HF_HUB_OFFLINE", "weights=PATH", "hf download"):
        assert fragment in message, (fragment, message)


def test_bad_names_and_images_are_named(small):
    with pytest.raises(UsageError, match="unknown encoder 'dinov3'; the supported encoders are dinov2_vits14"):
        load_encoder("dinov3")
    with pytest.raises(UsageError, match=r"takes \(N, 3, 256, 256\) images, got \(1, 3, 128, 128\)"):
        small.features(torch.zeros(1, 3, 128, 128, dtype=torch.uint8))
