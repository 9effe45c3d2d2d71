"""diffusers interop: a DiT of this project as diffusers' DiTTransformer2DModel (and a DiTPipeline
folder through dit.export --format diffusers) computes the same outputs, and a diffusers DiT folder
loads back bit for bit wherever weights are read (dit.sample, module.init_from=, DiT.from_state_dict)."""

import json

import numpy as np
import pytest
import torch
from conftest import one_line_error
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from dit.data.vae import SCALE_FACTOR, tiny_vae
from dit.diffusion import create_diffusion
from dit.errors import UsageError, exit_on_usage_error
from dit.evaluation.sample import load_model
from dit.evaluation.sample import main as sample_main
from dit.models import DiT, backbone_state_dict
from dit.models.diffusers_format import (
    EXPORT_FILE,
    diffusers_config,
    from_diffusers,
    official_timesteps,
    to_diffusers,
)
from dit.tools.export import main as export_main
from dit.tools.export import run_vae
from dit.training.checkpoints import load_weights_file
from dit.training.manifest import weights_digest

# Two sizes: latents with learned sigma; 3-channel pixels, wider heads, patch 4, fixed sigma.
SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
PIXELS = dict(
    input_size=8, patch_size=4, in_channels=3, hidden_size=96, depth=3, num_heads=6, num_classes=7, learn_sigma=False
)


def randomized(model, seed=0):
    """`model` with every trainable weight moved off its init: adaLN-Zero zeroes the gates, the
    modulations and the final layer, and with them a wrong mapping of those would still match."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


def inputs(model, seed=1):
    """Four samples: timesteps from both ends of the process, and the null class (dropped label) among the labels."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, model.in_channels, model.input_size, model.input_size, generator=generator)
    return x, torch.tensor([0, 17, 500, 999]), torch.tensor([1, model.num_classes, 0, model.num_classes - 1])


def diffusers_out(transformer, x, t, y):
    return transformer(x, timestep=t, class_labels=y).sample


@pytest.mark.parametrize("config", [SMALL, PIXELS], ids=["d2w64p2-4ch-sigma", "d3w96p4-3ch"])
@torch.no_grad()
def test_project_model_as_diffusers_computes_the_same(config):
    model = randomized(DiT(**config))
    x, t, y = inputs(model)
    ours = model(x, t, y)
    assert ours.shape[1] == model.out_channels and ours.abs().mean() > 0.1  # the zero-init layers do something
    transformer = to_diffusers(model)
    assert transformer.config.out_channels == model.out_channels  # 2 * in_channels with learn_sigma
    torch.testing.assert_close(transformer.pos_embed.pos_embed, model.pos_embed, rtol=0, atol=0)  # same sin-cos
    # the MLP's LayerNorm eps is the official 1e-6, not diffusers' default 1e-5: too small a change for assert_close
    assert {block.norm3.eps for block in transformer.transformer_blocks} == {model.blocks[0].norm2.eps} == {1e-6}
    # Stock diffusers embeds t with frequencies 10000^(-k/127), the official code 10000^(-k/128):
    # the outputs differ, and by nothing else, as the project model given diffusers' frequencies shows.
    stock = diffusers_out(transformer, x, t, y)
    assert not torch.allclose(stock, ours, atol=1e-3)
    official = model.t_embedder.freqs.clone()
    half = official.numel()
    model.t_embedder.freqs.copy_(torch.exp(-np.log(10000) * torch.arange(half, dtype=torch.float32) / (half - 1)))
    torch.testing.assert_close(stock, model(x, t, y))
    model.t_embedder.freqs.copy_(official)
    # With the official frequencies, diffusers' class computes the project's model.
    torch.testing.assert_close(diffusers_out(official_timesteps(transformer), x, t, y), ours)
    # the label path matters: the null class and a real one give other outputs
    assert not torch.allclose(model(x[:1], t[:1], y[1:2]), ours[:1], atol=1e-3)


@torch.no_grad()
def test_a_diffusers_model_loads_back_bit_for_bit_and_computes_the_same(tmp_path):
    model = randomized(DiT(**SMALL))
    back = from_diffusers(to_diffusers(model))
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
    # A model diffusers built itself, its embedder copies tied as DiT's are: through a saved folder.
    torch.manual_seed(0)
    native = DiTTransformer2DModel(**diffusers_config(DiT(**PIXELS))).eval()  # eval: no label dropout
    with torch.no_grad():
        for p in native.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for block in native.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(native.transformer_blocks[0].norm1.emb.state_dict())
    native.save_pretrained(tmp_path / "native")
    project = from_diffusers(tmp_path / "native")
    again = to_diffusers(project).state_dict()
    assert again.keys() == native.state_dict().keys()
    assert all(torch.equal(v, native.state_dict()[k]) for k, v in again.items())
    x, t, y = inputs(project)
    torch.testing.assert_close(project(x, t, y), diffusers_out(official_timesteps(native), x, t, y))
    # per-block embedders trained apart cannot become one shared embedder
    with torch.no_grad():
        native.transformer_blocks[2].norm1.emb.class_embedder.embedding_table.weight[0, 0] += 1
    with pytest.raises(UsageError, match="block 2's copy of the class_embedder differs from block 0's"):
        from_diffusers(native)


def export_cli(capsys, *args):
    """`python -m dit.export ...` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        exit_on_usage_error(lambda: export_main([str(a) for a in args]))
    out = capsys.readouterr()
    return exited.value.code, out.out, out.err


CPU_DDIM5 = ["--num-samples", "4", "--batch-size", "2", "sampler=ddim", "sampler.steps=ddim5"]
CPU_DDIM5 += ["--guidance-scale", "4", "--devices", "1", "--accelerator", "cpu"]


def test_export_of_a_train_run_loads_in_diffusers_and_samples_as_the_checkpoint(tiny_run, tmp_path, capsys):
    out = tmp_path / "digits-diffusers"
    export_main([str(tiny_run), str(out), "--format", "diffusers"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "pixel-space model has no VAE, so no DiTPipeline" in printed[0]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors", EXPORT_FILE]
    transformer = DiTTransformer2DModel.from_pretrained(out)
    ckpt = torch.load(tiny_run, weights_only=False)
    run_model = DiT.from_state_dict(ckpt).eval()  # the EMA weights, 4 heads from the run's config
    x, t, y = inputs(run_model)
    with torch.no_grad():
        torch.testing.assert_close(diffusers_out(official_timesteps(transformer), x, t, y), run_model(x, t, y))
    # every reader of weights takes the folder: dit.sample's load_model, init_from's load, dit.sample itself
    model, data, provenance = load_model(out)
    pt = load_model(export_main([str(tiny_run), str(tmp_path / "ema.pt")]))
    assert provenance["weights_digest"] == weights_digest(backbone_state_dict(ckpt)) == pt[2]["weights_digest"]
    assert data == (True, 1.0) and model.diffusion_options == pt[0].diffusion_options and model.num_heads == 4
    assert provenance["step"] == 12 and provenance["run"]["run_id"] == ckpt["manifest"]["run_id"]
    fresh = DiT(**{k: v for k, v in ckpt["config"]["model"].items() if k != "_target_"})
    fresh.load_state_dict(backbone_state_dict(load_weights_file(out)))  # what module.init_from= does
    sample_main([str(tiny_run), str(tmp_path / "from-ckpt"), *CPU_DDIM5])
    sample_main([str(out), str(tmp_path / "from-diffusers"), *CPU_DDIM5])
    images = [np.load(tmp_path / f"from-{name}.npz")["arr_0"] for name in ("ckpt", "diffusers")]
    assert np.array_equal(*images)
    # an earlier diffusers export is replaced; the folder is an export: exporting it again is refused
    export_main([str(tiny_run), str(out), "--format", "diffusers"])
    code, _, err = export_cli(capsys, out, tmp_path / "again", "--format", "diffusers")
    assert code == 2 and one_line_error(err, "is already an export (of", "step 12)")


def test_export_refuses_outputs_that_are_no_diffusers_export(tiny_run, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("my notes")
    code, _, err = export_cli(capsys, tiny_run, tmp_path / "notes.txt", "--format", "diffusers")
    assert code == 2 and one_line_error(err, "is a file; --format diffusers writes a folder")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    code, _, err = export_cli(capsys, tiny_run, tmp_path / "mine", "--format", "diffusers")
    assert code == 2 and one_line_error(err, "is a folder that holds no export of dit.export")
    assert (tmp_path / "mine" / "keep.txt").read_text() == "x"
    code, _, err = export_cli(capsys, tmp_path / "mine", tmp_path / "x", "--format", "diffusers")
    assert code == 2 and one_line_error(err, "no checkpoint file at", "no diffusers DiT folder")


LATENT = dict(SMALL, num_classes=1000)  # DiTPipeline guides with class 1000 as the null class


def latent_checkpoint(path, vae=None, **model):
    """A train.py checkpoint of a latent run (the Lightning keys export reads; EMA = live weights)."""
    flow = model.pop("flow", False)
    config = dict(LATENT, **model)
    dit = randomized(DiT(**config))
    state = {f"model.{k}": v for k, v in dit.state_dict().items()}
    data = dict(path=str(path.parent / "no-shards"), channels=config["in_channels"], latent_size=config["input_size"])
    data |= dict(num_classes=config["num_classes"], scale_factor=SCALE_FACTOR, pixels=False)
    if vae:
        data["vae"] = vae
    diffusion = dict(timestep_respacing="", noise_schedule="linear", diffusion_steps=1000, learn_sigma=dit.learn_sigma)
    objective = {"_target_": f"dit.diffusion.objectives.{'FlowMatching' if flow else 'Hybrid'}"}
    checkpoint = dict(state_dict=state, current_model_state=state, global_step=7, loops={}, manifest={"run_id": "lat"})
    checkpoint["config"] = {"model": config, "data": data, "module": {"diffusion": diffusion, "objective": objective}}
    torch.save(checkpoint, path)
    return path, dit


def run_pipeline(pipe):
    images = pipe(class_labels=[1], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()  # tiny_vae: 8x up, as the SD VAE


def test_latent_run_exports_a_dit_pipeline_with_or_without_its_vae(tmp_path, capsys):
    source, model = latent_checkpoint(tmp_path / "latent.ckpt", vae="nobody/no-such-vae")
    out = tmp_path / "pipe"
    export_main([str(source), str(out), "--format", "diffusers"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == [
        f"wrote the ema weights of DiT-d2w64/2 (adaln_zero, 4×8×8 latent, 1000 classes, learned sigma) (step 7) "
        f"to {out} without its VAE (nobody/no-such-vae is not on this machine); load: DiTPipeline.from_pretrained("
        f"'{out}', vae=AutoencoderKL.from_pretrained('nobody/no-such-vae'))"
    ]
    record = json.loads((out / EXPORT_FILE).read_text())
    assert record["vae"] == "nobody/no-such-vae" and not record["vae_included"] and not (out / "vae").exists()
    scheduler = DDIMScheduler.from_pretrained(out / "scheduler")
    paper = create_diffusion("")  # the paper's 1000 linear-β steps
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.prediction_type == "epsilon"
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), paper.alphas_cumprod.double(), rtol=1e-5, atol=0)
    pipe = DiTPipeline.from_pretrained(out, vae=tiny_vae())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in from_diffusers(pipe.transformer).state_dict().items())
    run_pipeline(pipe)
    # dit.sample's load_model takes the pipeline folder, as latents at the run's scale
    loaded, data, _ = load_model(out)
    assert data == (False, SCALE_FACTOR) and weights_digest(loaded.state_dict()) == weights_digest(model.state_dict())

    # the run's VAE on this machine (a folder here; a hub id in the local cache alike) goes into vae/
    tiny_vae().save_pretrained(tmp_path / "vae-folder")
    export_main([str(source), str(out), "--format", "diffusers", "--vae", str(tmp_path / "vae-folder")])
    assert f"with the VAE {tmp_path / 'vae-folder'}" in capsys.readouterr().out
    assert AutoencoderKL.from_pretrained(out / "vae").config.scaling_factor == SCALE_FACTOR
    run_pipeline(DiTPipeline.from_pretrained(out))


def test_the_run_vae_is_the_one_its_data_name(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    config = {"data": {"path": str(shards)}}
    assert run_vae(config) == "stabilityai/sd-vae-ft-ema"  # dit.extract's default
    (shards / "meta.json").write_text(json.dumps({"vae": "mse"}))  # dit.extract --vae mse records it
    assert run_vae(config) == "stabilityai/sd-vae-ft-mse"
    assert run_vae({"data": {"path": str(shards), "vae": "org/vae"}}) == "org/vae"
    assert run_vae(config, given="ema") == "stabilityai/sd-vae-ft-ema"


@pytest.mark.parametrize(
    "model, says",
    [
        (dict(conditioning="cross_attn"), "conditioning is cross_attn; diffusers' DiT class"),
        (dict(conditioning="in_context"), "conditioning is in_context; diffusers' DiT class"),
        (dict(conditioning="adaln"), "conditioning is adaln; diffusers' DiT class"),
        (dict(rope=True, mlp="swiglu", norm="rmsnorm"), "blocks use rope=True, mlp=swiglu, norm=rmsnorm"),
        (dict(qk_norm=True), "blocks use qk_norm=True (conf/blocks/); diffusers' DiT class"),
        (dict(flow=True), "this run trained a flow (objective=flow)"),
    ],
)
def test_other_designs_are_refused_in_one_line(tmp_path, capsys, model, says):
    source, _ = latent_checkpoint(tmp_path / "other.ckpt", **model)
    code, _, err = export_cli(capsys, source, tmp_path / "out", "--format", "diffusers")
    line = one_line_error(err, says)
    assert code == 2 and ("adaLN-Zero" in line or "flow" in line) and not (tmp_path / "out").exists()


def test_a_foreign_diffusers_folder_is_read_or_refused_in_one_line(tmp_path, capsys):
    """A folder dit.export did not write (the hub's facebook/DiT-XL-2-256 is one): its config says the
    model, its model_index.json the data; a diffusers transformer of another kind is refused."""
    to_diffusers(randomized(DiT(**PIXELS))).save_pretrained(tmp_path / "pixels")
    model, data, _ = load_model(tmp_path / "pixels")
    assert model.num_heads == 6 and data == (True, 1.0) and model.diffusion_options["learn_sigma"] is False
    config = json.loads((tmp_path / "pixels" / "config.json").read_text())
    (tmp_path / "pixart").mkdir()
    (tmp_path / "pixart" / "config.json").write_text(json.dumps(config | {"norm_type": "ada_norm_single"}))
    with pytest.raises(SystemExit):
        exit_on_usage_error(lambda: sample_main([str(tmp_path / "pixart"), str(tmp_path / "s"), *CPU_DDIM5]))
    one_line_error(capsys.readouterr().err, "norm_type='ada_norm_single'", "adaLN-Zero transformer")
