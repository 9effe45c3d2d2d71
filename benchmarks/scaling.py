"""DDP's linear scaling in one command: `python -m dit.benchmark` on one device, then on each count
of --devices, one after the other on this machine, and each rate against N × the one-device rate
(at the same per-device batch).

    python benchmarks/scaling.py --devices 2 4 -- --model DiT-XL/2 --batch-size 32 --steps 30 --warmup 8
    python benchmarks/scaling.py --global-batch-size 256 --devices 2 4 -- --model DiT-XL/2 --steps 30 --warmup 8
    NCCL_CTA_POLICY=1 python benchmarks/scaling.py --devices 2 -- ...    # any NCCL or torch variable
    DDP_HOOK=bf16 python benchmarks/scaling.py --runner benchmarks/variants.py --devices 2 -- ...

Everything after `--` goes to the benchmark unchanged (model, per-device batch, steps ...); environment
variables reach it too, so benchmarks/variants.py's variants apply to every run.
--global-batch-size keeps the batch summed over devices fixed instead, as a training run of the
paper's recipe (256) does on any machine: N devices run at 256/N each, against one device at
256/N (linear scaling at that per-device batch), so each per-device batch has its own one-device
run, just before the first count that needs it; give no --batch-size after `--` then.

Each run is its own process, killed with its children after --timeout seconds: Lightning ignores
SIGTERM, and a DDP run that hangs at exit would otherwise stop the rest; what is left of a run when
it exits is killed too. A killed run is reported and skipped. Give the first runs on a fresh
machine minutes: torch.compile fills its cache there (DiT-XL/2 under DDP on 4 H100s had not
reached a timed step after 200 s).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def plan(devices, global_batch_size=None):
    """The runs, (devices, per-device batch or None: the benchmark's own), in order: the one-device
    run that a count is divided by comes before it, and no run twice."""
    runs = []
    for n in devices:
        batch = None if global_batch_size is None else global_batch_size // n
        runs += [(1, batch), (n, batch)]
    return list(dict.fromkeys(runs))


def run(runner, bench_args, devices, batch, timeout, out_dir):
    """One benchmark run on `devices` devices (at `batch` a device unless None); its result dict,
    or None if it failed or timed out."""
    out = Path(out_dir) / f"devices{devices}_batch{batch}.json"
    command = [sys.executable, *(["-m", "dit.benchmark"] if runner is None else [runner])]
    command += [*bench_args, *([] if batch is None else ["--batch-size", str(batch)])]
    command += ["--devices", str(devices), "--json", str(out)]
    print("$", " ".join(command), flush=True)
    label = f"devices={devices}" + ("" if batch is None else f" batch={batch}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(command, env=env, start_new_session=True)  # its own group: the kill reaches DDP's ranks
    killed = False
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        killed = True
    finally:  # also on Ctrl-C (the run's own group does not get it), and after a normal exit,
        # where a rank or compile worker left hanging would hold the GPUs of the next run
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the whole group has ended
            pass
        proc.wait()
    if killed:
        print(f"  {label}: killed after {timeout} s", flush=True)
        return None
    if not out.exists():
        print(f"  {label}: exit status {rc}, no figures", flush=True)
        return None
    return json.loads(out.read_text())


def table(results):
    """Rows (devices, per-device batch, images/s, per device, fraction of linear or None), each
    against the one-device run at its batch; by batch (largest first), then devices."""
    rows = []
    for (devices, batch), r in sorted(results.items(), key=lambda item: (-(item[0][1] or 0), item[0][0])):
        if r is None:
            continue
        base = results.get((1, batch))
        rate = r["train_images_per_sec"]
        linear = rate / (devices * base["train_images_per_sec"]) if base and devices > 1 else None
        rows.append((devices, r.get("batch_size", batch), rate, rate / devices, linear))
    return rows


def given(option, args):
    """Whether `args` name `option`, also as `--option=value` or as a prefix argparse would expand."""
    names = [arg.split("=")[0] for arg in args if arg.startswith("--")]
    return any(len(name) > 2 and option.startswith(name) for name in names)


def positive(text):
    """argparse's type for counts: an int of 1 or more."""
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive count")
    return int(text)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ours, bench_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--devices",
        type=positive,
        nargs="+",
        required=True,
        help="device counts, each run after the one-device run it is divided by",
    )
    p.add_argument(
        "--global-batch-size",
        type=positive,
        help="the batch summed over devices (the paper's: 256); each count N runs at this / N a device",
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds a run may take before it is killed")
    p.add_argument("--runner", help="a script to run instead of `python -m dit.benchmark`, e.g. benchmarks/variants.py")
    args = p.parse_args(ours)
    if given("--devices", bench_args) or given("--json", bench_args):
        raise SystemExit("give --devices before `--` (to this script) and no --json after it: each run writes its own")
    if args.global_batch_size is not None:
        if given("--batch-size", bench_args):
            raise SystemExit(
                "give --global-batch-size or a --batch-size after `--`, not both: it sets each run's batch"
            )
        if any(args.global_batch_size % n for n in args.devices):
            raise SystemExit(
                f"--global-batch-size {args.global_batch_size}: give a multiple of each count of --devices"
            )
    results = {}
    with tempfile.TemporaryDirectory() as out_dir:
        for devices, batch in plan(args.devices, args.global_batch_size):
            results[devices, batch] = run(args.runner, bench_args, devices, batch, args.timeout, out_dir)
    print("\ndevices | batch/device | images/s | per device | of linear")
    for devices, batch, rate, per_device, linear in table(results):
        ratio = "—" if linear is None else f"{100 * linear:.1f}%"
        print(f"{devices:7d} | {batch or '—':>12} | {rate:8.1f} | {per_device:10.1f} | {ratio}")
    for (devices, batch), r in results.items():
        if devices == 1 and r is None:
            print("(no one-device figure" + ("" if batch is None else f" at batch {batch}") + ": no ratio)")
    return results


if __name__ == "__main__":
    main()
