"""The sweep's charts built by code in wandb (dit.evaluation.wandb_charts): an offline run whose files
hold the tables and the chart specs; the online call path against a stand-in for wandb."""

import json
import math

import pytest

from dit.evaluation.run_summaries import aggregate, run_record
from dit.evaluation.wandb_charts import log_sweep_charts


def summary(name, patch, gflops, seed, history):
    return dict(
        name=name,
        model_name=name,
        patch=patch,
        gflops=gflops,
        params=1000,
        global_batch_size=8,
        seed=seed,
        config_group=name,
        metric=dict(key="val/digits_fd", name="digits FD", history=history),
    )


@pytest.fixture
def sweep_runs():
    runs = [
        run_record(summary("DiT-S/4", 4, 0.01, 0, [[5, 90.0], [10, 70.0]]), [], "a"),
        run_record(summary("DiT-S/4", 4, 0.01, 1, [[5, 100.0], [10, 80.0]]), [], "b"),
        run_record(summary("DiT-S/2", 2, 0.04, 0, [[5, 60.0], [10, 40.0]]), [], "c"),
    ]
    return runs, aggregate(runs)


def record_payload(record):
    """The bytes of an offline run's record file without its framing: wandb (0.31) writes LevelDB's log
    format, a 7-byte file header, then 32 KiB blocks of chunks, each with a 7-byte header (checksum,
    little-endian length, type), so a record may be split where a block ends."""
    payload, pos, block = bytearray(), 7, 32768
    while pos + 7 <= len(record):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length = int.from_bytes(record[pos + 4 : pos + 6], "little")
        payload += record[pos + 7 : pos + 7 + length]
        pos += 7 + length
    return bytes(payload)


def chart_specs(record):
    """The custom-chart specs an offline run's record file holds: wandb (0.31) keeps each chart's
    spec as the JSON value of its config key `_wandb.visualize.<key>`; {table key: spec}."""
    record = record_payload(record)
    specs, decoder, start = {}, json.JSONDecoder(), 0
    while (start := record.find(b'{"panel_type"', start)) >= 0:
        spec, end = decoder.raw_decode(record[start:].decode("utf-8", errors="replace"))
        query = spec["panel_config"]["userQuery"]["queryFields"][0]["fields"][-1]
        specs[query["args"][0]["value"]] = spec["panel_config"]
        start += end
    return specs


def test_the_sweep_run_holds_the_tables_and_the_charts_offline(sweep_runs, tmp_path):
    runs, points = sweep_runs
    png = tmp_path / "figure.png"
    from PIL import Image

    Image.new("RGB", (8, 8), "white").save(png)
    folder = log_sweep_charts(
        points, runs, {"fid_vs_gflops": png}, project="dit", group="sweep", name="charts", folder=tmp_path, offline=True
    )
    import wandb

    # run.finish() returns before wandb's service process has written the record file (0.31: it was
    # still 7 bytes, its header, in one of eight runs on a loaded machine); tearing the service down
    # waits for it, as a sweep's exit does.
    wandb.teardown()
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    assert str(run_dir) in str(folder)
    tables = {
        p.name.split("_table")[0].split("_0_")[0]: json.loads(p.read_text()) for p in run_dir.rglob("*.table.json")
    }
    configs = next(t for name, t in tables.items() if name == "configs")
    rows = [dict(zip(configs["columns"], row)) for row in configs["data"]]
    assert [(r["name"], r["seeds"], r["final"], r["final_spread"]) for r in rows] == [
        ("DiT-S/4", 2, 75.0, pytest.approx(math.sqrt(50))),  # the two seeds' mean and sample deviation
        ("DiT-S/2", 1, 40.0, 0.0),
    ]
    assert rows[0]["log10_gflops"] == pytest.approx(-2) and rows[0]["compute_gflops"] == pytest.approx(
        0.01 * 8 * 10 * 3
    )
    history = next(t for name, t in tables.items() if name == "history")
    assert len(history["data"]) == 6  # every measurement of every run
    runs_table = next(t for name, t in tables.items() if name == "runs")
    assert sorted(r[runs_table["columns"].index("seed")] for r in runs_table["data"]) == [0, 0, 1]

    specs = chart_specs(next(run_dir.glob("*.wandb")).read_bytes())
    assert specs["scaling/fid_vs_gflops_table"]["panelDefId"] == "wandb/lineseries/v0"
    assert specs["scaling/fid_vs_gflops_points_table"]["panelDefId"] == "wandb/scatter/v0"
    assert specs["scaling/fid_vs_gflops_points_table"]["fieldSettings"] == {"x": "log10_gflops", "y": "final"}
    for key in ("scaling/fid_vs_compute_table", "scaling/fid_over_training_table"):
        assert specs[key]["panelDefId"] == "wandb/lineseries/v0"
    assert "digits FD" in specs["scaling/fid_over_training_table"]["stringSettings"]["title"]
    # the line series tables: one line per patch size, at log10 Gflops
    series = next(t for name, t in tables.items() if name == "fid_vs_gflops")
    lines = {}
    for row in series["data"]:
        item = dict(zip(series["columns"], row))
        lines.setdefault(item["lineKey"], []).append((item["step"], item["lineVal"]))
    assert lines == {"patch 2": [(pytest.approx(math.log10(0.04)), 40.0)], "patch 4": [(-2.0, 75.0)]}
    assert list(run_dir.rglob("*.png"))  # the figures go along


def test_online_the_run_goes_to_the_sweeps_project_and_group(sweep_runs, tmp_path, monkeypatch):
    """No network here: a stand-in for wandb.init records how the run is created and what it logs.
    Online, the mode is left to wandb's own settings, as the jobs' WandbLogger leaves it."""
    import wandb

    runs, points = sweep_runs
    created, logged = {}, {}

    class Run:
        dir = str(tmp_path / "run" / "files")

        def log(self, values):
            logged.update(values)

        def finish(self):
            created["finished"] = True

    monkeypatch.setattr(wandb, "init", lambda **kwargs: created.update(kwargs) or Run())
    log_sweep_charts(
        points,
        runs,
        {},
        project="team-dit",
        entity="team",
        group="multirun/x",
        name="n",
        folder=tmp_path,
        offline=False,
    )
    assert created["mode"] is None and created["project"] == "team-dit" and created["entity"] == "team"
    assert created["group"] == "multirun/x" and created["job_type"] == "sweep-summary" and created["finished"]
    assert {"scaling/configs", "scaling/fid_vs_gflops", "scaling/fid_vs_compute", "scaling/fid_over_training"} <= set(
        logged
    )
    assert isinstance(logged["scaling/fid_vs_gflops"], wandb.plot.CustomChart)
