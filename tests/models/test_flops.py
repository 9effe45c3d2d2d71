"""Gflops and parameters (dit.models.flops) against the paper: Table 4, the §3.2 ablation, 512 px."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import child_env, tiny

from dit.models import CONDITIONINGS, DiT_models
from dit.models.flops import count_gflops, count_params, measure
from dit.models.flops import main as flops_main

# Paper Table 4 (256px): Gflops and parameters (M).
TABLE_4 = {
    "DiT-S/8": (0.36, 33),
    "DiT-S/4": (1.41, 33),
    "DiT-S/2": (6.06, 33),
    "DiT-B/8": (1.42, 131),
    "DiT-B/4": (5.56, 130),
    "DiT-B/2": (23.01, 130),
    "DiT-L/8": (5.01, 459),
    "DiT-L/4": (19.70, 458),
    "DiT-L/2": (80.71, 458),
    "DiT-XL/8": (7.39, 676),
    "DiT-XL/4": (29.05, 675),
    "DiT-XL/2": (118.64, 675),
}


# Paper §4 conditioning ablation on XL/2: Gflops and parameters (M).
ABLATION = {
    "in_context": (119.37, 449),
    "cross_attn": (137.62, 598),
    "adaln": (118.56, 600),
    "adaln_zero": (118.64, 675),
}


@pytest.mark.parametrize("name", list(TABLE_4))
def test_gflops_and_params_match_table_4(name):
    gflops, params, _ = measure(name)
    paper_gflops, paper_params = TABLE_4[name]
    assert gflops == pytest.approx(paper_gflops, rel=0.01, abs=0.02)
    assert params / 1e6 == pytest.approx(paper_params, rel=0.01)


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_conditioning_ablation_matches_paper(conditioning):
    gflops, params, _ = measure("DiT-XL/2", conditioning)
    paper_gflops, paper_params = ABLATION[conditioning]
    assert gflops == pytest.approx(paper_gflops, rel=0.01)
    assert params / 1e6 == pytest.approx(paper_params, rel=0.01)


def test_xl2_parameter_count_equals_official():
    # Numbers the official train.py logs for DiT-XL/2 at 256px: all parameters, and trainable ones
    # (the sin-cos position embedding is a frozen parameter).
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"]()
    assert count_params(model) == 675_129_632
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 674_834_720
    assert len(model.state_dict()) == 292


def test_512px_gflops_match_paper():
    # Paper §5: DiT-XL/2 at 512×512 (64×64 latents, 1024 tokens) costs 524.60 Gflops.
    gflops, _, tokens = measure("DiT-XL/2", image_size=512)
    assert tokens == 1024
    assert gflops == pytest.approx(524.60, rel=0.01)


def test_flop_count_sees_attention_on_cpu():
    # The attention term is 2·T²·D per block; losing it (fused CPU kernel) would lower the count.
    model = tiny(depth=1, hidden_size=64, input_size=16, patch_size=1).eval()
    T, D = 256, 64
    no_attn_estimate = 12 * T * D * D  # qkv, proj, mlp
    assert count_gflops(model) * 1e9 > no_attn_estimate + 2 * T * T * D * 0.99


def test_flops_command_prints_whole_table(capsys):
    flops_main([])
    out = capsys.readouterr().out
    assert "multiply-add = 1 flop" in out
    rows = [line for line in out.splitlines() if line.startswith("| DiT-")]
    assert len(rows) == 15
    assert "| DiT-XL/2 | adaln_zero | 256 | 118.6" in out


@pytest.mark.parametrize("size, patch", [("260", "8"), ("0", "8"), ("100", "8")])
def test_an_image_size_the_table_cannot_patch_is_one_line(size, patch, capsys):
    """Through the `dit-flops` console script's function: a size not floored to another, no table, one line."""
    from dit.models.flops import cli

    with pytest.raises(SystemExit) as stop:
        cli_args = ["dit-flops", "--image-size", size]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("sys.argv", cli_args)
            cli()
    captured = capsys.readouterr()
    assert stop.value.code == 2 and captured.out == ""
    assert captured.err.strip() == (
        f"error: --image-size {size}: the latent (1/8 of it) must be a positive multiple of the patch {patch}; "
        f"give a multiple of {8 * int(patch)}, e.g. 256"
    )


def test_the_command_into_a_closed_pipe_ends_quietly():
    """`dit-flops | head -1`: the reader gone, the command ends with exit code 1 and no traceback
    (every tool runs through dit.errors.exit_on_usage_error). A pipe whose reading end is closed
    before the command starts makes its first write fail."""
    reading, writing = os.pipe()
    os.close(reading)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "dit.flops"],
            stdout=writing,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
            timeout=300,
        )
    finally:
        os.close(writing)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, (
        result.stderr
    )
