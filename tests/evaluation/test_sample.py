"""The sampling command (dit.sample) and the class-grid notebook, on the checkpoint of a real tiny
training run (digits, pixels) and on a tiny DiT of VAE latents with a small random AutoencoderKL."""

import json
import subprocess
import sys

import nbformat
import numpy as np
import pytest
import torch
from conftest import ROOT, bars, child_env, one_line_error
from nbclient import NotebookClient
from PIL import Image

from dit.data.vae import tiny_vae
from dit.evaluation.sample import main as sample_main
from dit.models import DiT


def run_sample(*args):
    result = subprocess.run(
        [sys.executable, "-m", "dit.sample", *map(str, args)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def cpu_ddim5(num_samples, batch_size):
    """dit.sample's arguments for a few samples of 5 DDIM steps on one CPU process."""
    return [
        "--num-samples",
        str(num_samples),
        "--batch-size",
        str(batch_size),
        "sampler=ddim",
        "sampler.steps=ddim5",
        "--devices",
        "1",
        "--accelerator",
        "cpu",
    ]


def test_same_samples_on_one_and_two_processes(tiny_run, tmp_path, capsys):
    """The same images from one process and from two; each draws its batches under a bar of its own,
    and rank 0 alone assembles the .npz, under one bar."""
    common = [
        tiny_run,
        "--num-samples",
        7,
        "--batch-size",
        2,
        "sampler=ddim",
        "sampler.steps=ddim10",
        "--guidance-scale",
        4,
        "--accelerator",
        "cpu",
        "--seed",
        3,
    ]
    sample_main([str(a) for a in [common[0], tmp_path / "one", *common[1:], "--devices", 1]])  # in this process
    err = capsys.readouterr().err
    assert bars(err, "rank 0") == ["7/7"] and bars(err, "PNGs to .npz") == ["7/7"]
    two = run_sample(common[0], tmp_path / "two", *common[1:], "--devices", 2)
    # batches 0, 2, 4, 6 (7 samples in batches of 2) on rank 0; 1, 3, 5 on rank 1
    assert bars(two.stderr, "rank 0") == ["4/4"] and bars(two.stderr, "rank 1") == ["3/3"]
    assert bars(two.stderr, "PNGs to .npz") == ["7/7"]  # from rank 0 only
    one_npz, two_npz = np.load(tmp_path / "one.npz")["arr_0"], np.load(tmp_path / "two.npz")["arr_0"]
    assert one_npz.shape == (7, 8, 8, 3) and one_npz.dtype == np.uint8  # pixels, no VAE; gray as RGB
    assert np.array_equal(one_npz, two_npz) and len(np.unique(one_npz.reshape(7, -1), axis=0)) == 7
    for i in range(7):
        assert (tmp_path / "one" / f"{i:06d}.png").read_bytes() == (tmp_path / "two" / f"{i:06d}.png").read_bytes()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one" / "000004.png")), one_npz[4])
    assert (tmp_path / "one.png").exists()  # the grid


def test_vae_latents_resume_and_labels(tmp_path, capsys):
    """A bare state dict (the official checkpoint's format) of 4 channels is decoded with the VAE;
    a rerun redraws only the batches with a missing PNG, and draws them the same."""
    torch.manual_seed(0)
    model = DiT(input_size=4, in_channels=4, hidden_size=64, depth=2, num_heads=1, patch_size=2, num_classes=5)
    torch.save(model.state_dict(), tmp_path / "export.pt")
    tiny_vae().save_pretrained(tmp_path / "vae")
    args = [
        str(tmp_path / "export.pt"),
        str(tmp_path / "s"),
        "--num-samples",
        "5",
        "--batch-size",
        "2",
        "sampler=ddim",
        "sampler.steps=ddim5",
        "--vae",
        str(tmp_path / "vae"),
        "--classes",
        "3,1",
        "--guidance-scale",
        "1.5",
        "--guidance",
        "all_channels",
        "--num-heads",
        "1",
        "--devices",
        "1",
        "--accelerator",
        "cpu",
    ]
    sample_main(args)
    first = np.load(tmp_path / "s.npz")["arr_0"]
    assert first.shape == (5, 32, 32, 3) and "arr_0 (5, 32, 32, 3) uint8" in capsys.readouterr().out
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").iterdir()}
    (tmp_path / "s" / "000003.png").unlink()  # batch 1 (samples 2, 3) is incomplete
    sample_main(args)
    again = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").iterdir()}
    redrawn = sorted(name for name in again if again[name] != stamps.get(name))
    assert redrawn == ["000002.png", "000003.png"] and np.array_equal(np.load(tmp_path / "s.npz")["arr_0"], first)
    with pytest.raises(ValueError, match="classes 0..4"):
        sample_main([*args[:-10], "--classes", "7", "--num-heads", "1", "--devices", "1", "--accelerator", "cpu"])
    # the same weights read with other heads are another model: never added to this folder
    with pytest.raises(ValueError, match=r"holds samples drawn with other settings \(model.num_heads: 1 -> 2\)"):
        sample_main([*args[:-5], "2", "--devices", "1", "--accelerator", "cpu"])


def test_a_folder_another_process_fills_or_a_file_is_refused(tiny_run, tmp_path, capsys):
    """Two sample runs into one folder would mix their PNGs under one record: the second is refused
    in one line while the first holds the folder's lock. A file given as the folder is refused too."""
    from dit.errors import exit_on_usage_error

    out = tmp_path / "s"
    out.mkdir()
    holder = "import sys, time; from dit.training.run_folder import RunLock; RunLock(sys.argv[1]).acquire(); "
    holder += "print('held', flush=True); time.sleep(60)"
    other = subprocess.Popen(
        [sys.executable, "-c", holder, str(out)], stdout=subprocess.PIPE, text=True, env=child_env()
    )
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as refused:
            exit_on_usage_error(lambda: sample_main([str(tiny_run), str(out), *cpu_ddim5(2, 2)]))
        assert refused.value.code == 2
        one_line_error(capsys.readouterr().err, f"{out} is in use by process {other.pid}", "sample into another folder")
        assert not list(out.glob("*.png")) and not (out / "manifest.json").exists()
    finally:
        other.kill()
        other.wait()
    with pytest.raises(SystemExit):  # a checkpoint that records its model takes no --num-heads
        exit_on_usage_error(
            lambda: sample_main([str(tiny_run), str(tmp_path / "h"), *cpu_ddim5(2, 2), "--num-heads", "2"])
        )
    one_line_error(capsys.readouterr().err, "--num-heads 2:", "records its model, with 4 heads")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        exit_on_usage_error(lambda: sample_main([str(tiny_run), str(tmp_path / "notes.txt"), *cpu_ddim5(2, 2)]))
    one_line_error(capsys.readouterr().err, "notes.txt is a file; the samples go into a folder")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_class_grid_notebook(tiny_run, monkeypatch):
    """notebooks/class_grid.ipynb runs top to bottom on the tiny run's checkpoint (nbclient, python3)."""
    notebook = nbformat.read(ROOT / "notebooks" / "class_grid.ipynb", as_version=4)
    parameters = notebook.cells[1]
    assert 'DDPM(steps="250")' in parameters.source
    parameters.source = parameters.source.replace(
        'DDPM(steps="250")', 'DDIM(steps="ddim20")'
    )  # seconds, not a minute, on 2 cores
    monkeypatch.setenv("DIT_CHECKPOINT", str(tiny_run))
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src"))
    NotebookClient(notebook, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "10 classes × 4 samples, 8×8 pixels" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the grid is shown


def test_fid50k_protocol_in_one_command(tiny_run, tmp_path, random_inception, capsys):
    """dit.fid50k = dit.sample then dit.fid on its .npz; against a folder of the same images the
    FID is ~0 and precision/recall are computed (the reference holds images)."""
    from dit.evaluation.fid50k import main as fid50k_main

    common = cpu_ddim5(6, 3)
    sample_main([str(tiny_run), str(tmp_path / "ref"), *common])
    metrics = fid50k_main(
        [
            str(tiny_run),
            str(tmp_path / "s"),
            "--ref",
            str(tmp_path / "ref"),
            "--inception-weights",
            str(random_inception),
            *common,
        ]
    )
    assert np.array_equal(np.load(tmp_path / "s.npz")["arr_0"], np.load(tmp_path / "ref.npz")["arr_0"])  # same seed
    assert abs(metrics["fid"]) < 1e-3 and metrics["precision"] == 1 and "inception_score" in metrics
    assert json.loads((tmp_path / "s.json").read_text()) == metrics
    assert metrics["samples"]["sampler.steps"] == "ddim5" and metrics["samples"]["step"] == 12  # what was measured
    assert metrics["samples"]["sampler.class"] == "dit.diffusion.samplers.DDIM"


def test_fid50k_checks_the_reference_and_inception_before_sampling(tiny_run, tmp_path, monkeypatch, capsys):
    """Hours of sampling never end in a refusal that its first second could have given."""
    from dit.errors import exit_on_usage_error
    from dit.evaluation.fid50k import main as fid50k_main

    monkeypatch.delenv("LOCAL_RANK", raising=False)  # as a user starts it: the launching process
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    for more, message in [
        (["--ref", str(tmp_path / "nope.npz")], "is not a folder of images, an .npz of statistics, or 'digits'"),
        (["--ref", str(tmp_path / "other.npz")], "holds ['x'], but it needs mu and sigma"),
        (["--ref", "digits", "--inception-weights", str(tmp_path / "nope.pth")], "do not exist; download"),
    ]:
        with pytest.raises(SystemExit):
            exit_on_usage_error(lambda m=more: fid50k_main([str(tiny_run), str(tmp_path / "s"), *m, *cpu_ddim5(2, 2)]))
        one_line_error(capsys.readouterr().err, message)
        assert not (tmp_path / "s").exists()


def test_a_sample_folder_is_resumed_only_by_what_drew_it(tiny_run, tmp_path, capsys):
    """Other weights or other sampler settings never take a folder's samples as theirs: refused
    with one line naming what differs, or with --overwrite drawn anew. The same weights in an
    export resume it (identity is the weights' digest, not the file)."""
    from dit.errors import exit_on_usage_error
    from dit.tools.export import main as export_main

    common = cpu_ddim5(4, 2)
    out = tmp_path / "s"
    sample_main([str(tiny_run), str(out), *common])
    first = np.load(f"{out}.npz")["arr_0"]
    drawn = json.loads(str(np.load(f"{out}.npz")["manifest"]))  # what drew them rides in the .npz
    assert drawn["source"]["step"] == 12 and drawn["identity"]["guidance_scale"] == 1.5
    live = export_main([str(tiny_run), str(tmp_path / "live.pt"), "--weights", "live"])
    for other, differing in [(live, "weights_digest"), (tiny_run, "guidance_scale: 1.5 -> 4.0")]:
        with pytest.raises(SystemExit) as refused:
            exit_on_usage_error(
                lambda: sample_main(
                    [str(other), str(out), *common, "--guidance-scale", "4" if other == tiny_run else "1.5"]
                )
            )
        assert refused.value.code == 2
        one_line_error(
            capsys.readouterr().err, f"{out} holds samples drawn with other settings", differing, "--overwrite"
        )
    assert np.array_equal(np.load(f"{out}.npz")["arr_0"], first)
    ema = export_main([str(tiny_run), str(tmp_path / "ema.pt")])
    (out / "000003.png").unlink()
    sample_main([str(ema), str(out), *common])  # the same weights from the export: resumed
    assert np.array_equal(np.load(f"{out}.npz")["arr_0"], first)
    capsys.readouterr()
    sample_main([str(ema), str(out), *cpu_ddim5(2, 2)])  # fewer: the first two, and a note of the rest
    assert np.array_equal(np.load(f"{out}.npz")["arr_0"], first[:2])
    assert "also holds 2 PNGs from 000002.png on, drawn for a larger --num-samples" in capsys.readouterr().out
    sample_main([str(live), str(out), *common, "--overwrite"])
    assert not np.array_equal(np.load(f"{out}.npz")["arr_0"], first)
    with pytest.raises(SystemExit):
        exit_on_usage_error(lambda: sample_main([str(tiny_run), str(tmp_path / "t"), *common, "--classes", "3,x"]))
    one_line_error(capsys.readouterr().err, "--classes '3,x': give class numbers separated by commas")


def test_folders_and_files_that_are_not_samples_are_left_alone(tiny_run, tmp_path, capsys):
    """A training run's folder, even with --overwrite, and an .npz beside the folder that no sample
    run wrote are refused; a start that failed before any sample leaves no record that blocks the
    corrected rerun; nan guidance is refused."""
    from dit.errors import exit_on_usage_error

    common = cpu_ddim5(2, 2)

    def refused(out, *more):
        with pytest.raises(SystemExit) as stop:
            exit_on_usage_error(lambda: sample_main([str(tiny_run), str(out), *common, *more]))
        assert stop.value.code == 2
        return capsys.readouterr().err

    run = tmp_path / "run"
    run.mkdir()
    record = json.dumps(dict(kind="training run", run_id="abc"))
    (run / "manifest.json").write_text(record)
    one_line_error(refused(run, "--overwrite"), f"{run} is a training run folder", "sample into another folder")
    assert (run / "manifest.json").read_text() == record and not (tmp_path / "run.npz").exists()

    (tmp_path / "mine.npz").write_bytes(b"my data")
    one_line_error(refused(tmp_path / "mine"), f"{tmp_path / 'mine.npz'} exists", "move it away")
    assert (tmp_path / "mine.npz").read_bytes() == b"my data"

    out = tmp_path / "s"
    with pytest.raises(SystemExit):  # fails after its manifest is written, before any sample
        bad = [a.replace("ddim5", "0") for a in common]
        exit_on_usage_error(lambda: sample_main([str(tiny_run), str(out), *bad]))
    capsys.readouterr()
    sample_main([str(tiny_run), str(out), *common])  # the corrected rerun
    assert np.load(f"{out}.npz")["arr_0"].shape[0] == 2 and not list(tmp_path.glob("*.tmp"))

    one_line_error(
        refused(tmp_path / "n", "--guidance-scale", "nan"), "--guidance-scale must be a number of at least 0"
    )
    one_line_error(refused(tmp_path / "d", "--devices", "0"), "--accelerator cpu --devices 0: ", "--devices 1)")


def test_float8_samples_are_recorded_as_such(tiny_run, tmp_path, capsys):
    """--float8 tensorwise (the CPU's float8 matmul) draws nearly the samples fp32 draws, not the
    same ones; the folder records it, so neither setting resumes the other's folder; rowwise on
    the CPU is one line."""
    from dit.errors import exit_on_usage_error

    common = cpu_ddim5(4, 4)
    plain, f8 = tmp_path / "plain", tmp_path / "f8"
    sample_main([str(tiny_run), str(plain), *common])
    sample_main([str(tiny_run), str(f8), *common, "--float8", "tensorwise"])
    a, b = (np.load(f"{out}.npz") for out in (plain, f8))
    assert json.loads(str(b["manifest"]))["identity"]["float8"] == "tensorwise"
    assert json.loads(str(a["manifest"]))["identity"]["float8"] is None
    difference = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
    assert 0 < difference.mean() < 4, difference.mean()  # of 255: float8's rounding, not other images
    for out, more, fragment in [
        (plain, ["--float8", "tensorwise"], "float8: None -> 'tensorwise'"),
        (tmp_path / "r", ["--float8", "rowwise"], "--float8 rowwise runs on CUDA GPUs"),
    ]:
        with pytest.raises(SystemExit):
            exit_on_usage_error(lambda: sample_main([str(tiny_run), str(out), *common, *more]))
        one_line_error(capsys.readouterr().err, fragment)
