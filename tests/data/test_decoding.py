"""What samples are (dit.data.decoding): pixels as they are, VAE latents decoded or previewed."""

import torch

from dit.data.decoding import LatentPreview, PixelDecoder, VAEDecoder, data_are_pixels, make_decoder
from dit.data.vae import tiny_vae


def test_the_data_config_says_whether_samples_are_pixels():
    assert data_are_pixels({"pixels": True, "channels": 4}) is True
    assert data_are_pixels({"pixels": False, "channels": 1, "scale_factor": 1.0}) is False
    # a config without the key (older runs): 1 or 3 channels at scale factor 1
    assert data_are_pixels({"channels": 1, "scale_factor": 1.0}) and not data_are_pixels(
        {"channels": 4, "scale_factor": 0.18215}
    )
    assert data_are_pixels(None, channels=3) and not data_are_pixels(None, channels=4)  # a bare state dict


def test_each_kind_of_data_gets_its_decoder():
    z = torch.randn(2, 4, 4, 4)
    assert isinstance(make_decoder(True, 1.0), PixelDecoder) and torch.equal(make_decoder(True, 2.0)(z), z / 2)
    preview = make_decoder(False, 0.18215)
    assert isinstance(preview, LatentPreview) and preview(z).shape == (2, 3, 4, 4) and preview(z).abs().max() <= 1
    vae = make_decoder(False, 0.18215, tiny_vae())
    assert isinstance(vae, VAEDecoder) and vae.upsampling == 8 and vae(z).shape == (2, 3, 32, 32)
