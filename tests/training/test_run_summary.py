"""Every run's summary.json (dit.training.run_summary): what the run is, its training compute as it
goes, and its final and best digits FD, kept across a resume; and the same summary in wandb's run."""

import json
import re

import train
from conftest import quick_cfg

from dit.models.flops import describe

FD = [
    "callbacks=fid_digits",
    "callbacks.fid.every_n_steps=3",
    "callbacks.fid.num_samples=40",
    "callbacks.fid.batch_size=20",
    "~callbacks.digits_accuracy",
    "trainer.val_check_interval=100",
    "trainer.log_every_n_steps=2",
    "data.global_batch_size=16",
    "seed=3",
]


def fd_lines(text):
    return {int(s): float(v) for s, v in re.findall(r"step (\d+): digits FD ([\d.]+)", text)}


def test_the_summary_holds_the_run_its_compute_and_its_fd_across_a_resume(tmp_path, digits_dir, capsys):
    out = tmp_path / "run"
    train.main(quick_cfg(out, digits_dir, "name=run", "trainer.max_steps=6", *FD))
    first = json.loads((out / "summary.json").read_text())
    printed = fd_lines(capsys.readouterr().out)
    assert sorted(printed) == [3, 6]
    with __import__("torch").device("meta"):
        from hydra.utils import instantiate

        model = describe(instantiate(quick_cfg(out, digits_dir, *FD).model))
    assert {k: first[k] for k in ("model_name", "patch", "conditioning", "objective", "seed", "global_batch_size")} == {
        "model_name": "DiT-d4w128/2",
        "patch": 2,
        "conditioning": "adaln_zero",
        "objective": "Hybrid",
        "seed": 3,
        "global_batch_size": 16,
    }
    assert (first["params"], first["gflops"], first["tokens"]) == (model["params"], model["gflops"], 16)
    assert first["step"] == 6 and first["status"] == "finished"
    assert abs(first["train_compute"] - model["gflops"] * 16 * 6 * 3) < 1e-9  # paper Fig. 9's axis
    metric = first["metric"]
    assert metric["key"] == "val/digits_fd" and metric["name"] == "digits FD"
    assert [s for s, _ in metric["history"]] == [3, 6]
    for step, value in metric["history"]:
        assert abs(value - printed[step]) < 0.01  # the values the monitor printed
    assert metric["final"] == metric["history"][-1][1] and metric["final_step"] == 6
    assert metric["best"] == min(v for _, v in metric["history"])
    # the CSV log has the same key
    assert "val/digits_fd" in next((out / "csv").rglob("metrics.csv")).read_text().splitlines()[0]

    # Resumed to step 9: the history before the resume is kept, the compute counts all 9 steps.
    train.main(quick_cfg(out, digits_dir, "name=run", "resume=auto", "trainer.max_steps=9", *FD))
    second = json.loads((out / "summary.json").read_text())
    assert [s for s, _ in second["metric"]["history"]] == [3, 6, 9]
    assert second["metric"]["history"][:2] == metric["history"]
    assert second["step"] == 9 and abs(second["train_compute"] - model["gflops"] * 16 * 9 * 3) < 1e-9
    assert second["run_id"] == first["run_id"] and second["config_group"] == first["config_group"]

    # Resumed with half the batch: steps 10 and 11 count 8 images each.
    changed = ["resume=auto", "trainer.max_steps=11", "data.global_batch_size=8", "accept_changes=true"]
    train.main(quick_cfg(out, digits_dir, "name=run", *FD, *changed))  # after FD: the later value wins
    third = json.loads((out / "summary.json").read_text())
    assert third["step"] == 11 and third["global_batch_size"] == 8
    assert abs(third["train_compute"] - model["gflops"] * (16 * 9 + 8 * 2) * 3) < 1e-9


def test_the_summary_goes_into_the_wandb_run(tmp_path, digits_dir):
    out = tmp_path / "run"
    train.main(quick_cfg(out, digits_dir, "logger=wandb", "trainer.max_steps=3", *FD))
    summary = json.loads((out / "summary.json").read_text())
    import wandb

    wandb.teardown()  # waits for wandb's service to write the record file (run.finish() does not)
    record = next((out / "wandb").glob("offline-run-*/*.wandb")).read_bytes()
    # an offline run keeps its summary updates in its record file, as JSON values under their keys
    for key in ("train/compute", "model_name", "val/digits_fd", "val/digits_fd_best", "config_group"):
        assert key.encode() in record, key
    assert json.dumps(summary["config_group"]).encode() in record
    assert json.dumps(summary["model_name"]).encode() in record
