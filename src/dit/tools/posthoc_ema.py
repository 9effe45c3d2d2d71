"""Post-hoc EMA (EDM2, Karras et al. 2024, §3.2 and Appendix C.3): the EMA of any relative width
σ_rel, rebuilt after training from the snapshots of the two power-function EMAs that the
posthoc_ema callback saved (conf/callbacks/posthoc_ema.yaml), and written as an export of
`python -m dit.export`, which `dit.sample`, `DiT.from_state_dict` and `module.init_from=` read.

    python -m dit.posthoc_ema outputs/my-run --sigma-rel 0.07 ema-0.070.pt
    python -m dit.posthoc_ema outputs/my-run --sigma-rel 0.15 --step 200000 ema-0.150-200k.pt

The result is the combination of the snapshots (those up to --step) whose averaging profile is
closest, in the least-squares sense, to the power-function profile of σ_rel at --step (EDM2's
Algorithm 3; NVlabs/edm2 training/phema.py `solve_posthoc_coefficients`). It is close, not exact:
the more snapshots, the closer (tests/training/test_posthoc_ema.py measures it).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import ArrayLike

from dit.errors import ArgumentParser, UsageError, exit_on_usage_error
from dit.models import describe_state_dict
from dit.tools.export import check_output, export
from dit.training.callbacks.posthoc_ema import (
    MAX_SIGMA_REL,
    SNAPSHOT_FOLDER,
    SNAPSHOT_KIND,
    check_sigma_rel,
    sigma_rel_to_gamma,
)
from dit.training.checkpoints import AtomicCheckpointIO, check_integrity, read_checkpoint


@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int
    sigma_rel: float
    gamma: float


def profile_inner_product(t_a: ArrayLike, gamma_a: ArrayLike, t_b: ArrayLike, gamma_b: ArrayLike) -> np.ndarray:
    """∫ p_a(τ) p_b(τ) dτ of two power-function profiles p(τ) = (γ+1) τ^γ / t^(γ+1) on (0, t]
    (EDM2 Eq. 121), elementwise over arrays. With t_a <= t_b the product is nonzero on (0, t_a]:
    (γa+1)(γb+1) / (t_a^(γa+1) t_b^(γb+1)) · t_a^(γa+γb+1) / (γa+γb+1)
    = (γa+1)(γb+1) / ((γa+γb+1) t_b) · (t_a/t_b)^γb (Eq. 151; phema.py `power_function_correlation`)."""
    t_a, gamma_a, t_b, gamma_b = np.broadcast_arrays(
        *(np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    )
    a_first = t_a <= t_b
    longer = np.maximum(t_a, t_b)
    ratio = np.minimum(t_a, t_b) / longer
    exponent = np.where(a_first, gamma_b, gamma_a)  # the exponent of the longer profile
    return (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * longer) * ratio**exponent


def solve_coefficients(steps: ArrayLike, gammas: ArrayLike, target_step: float, target_gamma: float) -> np.ndarray:
    """The weights x of the snapshots (at `steps`, of exponents `gammas`) such that Σ x_i p_i is the
    least-squares fit of the target profile p: the normal equations A x = b with A_ij = <p_i, p_j>
    and b_i = <p_i, p> (EDM2 Algorithm 3), then scaled to sum to 1 so that the result stays an
    average of weights (as phema.py does). The fit is in continuous time; the discrete update's
    weights are the profile's integrals over each step (callbacks/posthoc_ema.py), so the same
    coefficients combine the discrete averages. lstsq rather than phema.py's solve: the same
    answer where A is regular (1e-11 apart at 100 snapshots per profile, condition number 1e7),
    and still one where it is singular (two snapshots of the same step and σ_rel)."""
    steps = np.asarray(steps, dtype=np.float64)
    gammas = np.asarray(gammas, dtype=np.float64)
    gram = profile_inner_product(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    target = profile_inner_product(steps, gammas, float(target_step), float(target_gamma))
    x = np.linalg.lstsq(gram, target, rcond=None)[0]
    return x / x.sum()


def list_snapshots(folder: str | Path) -> list[Snapshot]:
    """The snapshots in `folder`, by step then σ_rel, read from their manifests (memory-mapped:
    nothing large is read)."""
    found = []
    for path in sorted(Path(folder).glob("phema-*.pt")):
        try:
            data = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except OSError:
            raise
        except Exception as err:  # a truncated zip, a corrupt pickle
            raise UsageError(
                f"snapshot {path} is truncated or corrupt ({type(err).__name__}: {err}); delete it "
                "(the reconstruction then goes without it) or restore it"
            ) from None
        manifest = data.get("manifest") if isinstance(data, dict) else None
        if not manifest or manifest.get("kind") != SNAPSHOT_KIND:
            continue  # not one of ours: ignored, as EDM2 ignores files of other names
        found.append(Snapshot(path, int(manifest["step"]), float(manifest["sigma_rel"]), float(manifest["gamma"])))
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


def choose_snapshots(snapshots: list[Snapshot], step: int | None, folder: Path) -> tuple[int, list[Snapshot]]:
    """(the step to reconstruct, the snapshots it combines: those up to it), or a UsageError."""
    if not snapshots:
        raise UsageError(
            f"no post-hoc EMA snapshots in {folder}: train with the posthoc_ema callback "
            "('callbacks=[default,posthoc_ema]', conf/callbacks/posthoc_ema.yaml), or give the run folder that holds phema/"
        )
    steps = sorted({s.step for s in snapshots})
    if step is None:
        step = steps[-1]
    elif step not in steps:
        shown = ", ".join(map(str, steps)) if len(steps) <= 8 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"
        raise UsageError(f"--step {step}: no snapshot at that step; the snapshots are at steps {shown}")
    return step, [s for s in snapshots if 0 < s.step <= step]


def reconstruct(snapshots: list[Snapshot], coefficients: np.ndarray) -> tuple[dict[str, torch.Tensor], dict]:
    """(Σ x_i · snapshot_i as an fp32 state dict, the last snapshot). Summed in float64 (8 bytes
    of memory per parameter), one snapshot read at a time: the coefficients alternate in sign, and
    fp32 sums would lose digits to the cancellation. The tensors the callback does not average (the frozen pos_embed,
    any buffer; not in the manifest's "averaged") are taken from the last snapshot as they are."""
    total, last = None, None
    for snapshot, x in zip(snapshots, coefficients):
        check_integrity(snapshot.path)
        last = torch.load(snapshot.path, map_location="cpu", weights_only=False, mmap=True)
        state, averaged = last["ema"], last["manifest"]["averaged"]
        if total is None:
            total = {k: torch.zeros(state[k].shape, dtype=torch.float64) for k in averaged}
        elif list(total) != list(averaged):
            raise UsageError(f"snapshot {snapshot.path} holds other weights than {snapshots[0].path}: not of one run")
        for k, v in total.items():
            v.add_(state[k].to(torch.float64), alpha=float(x))
    result = {k: total[k].to(torch.float32) if k in total else v.clone() for k, v in last["ema"].items()}
    return result, last


def run_config_of(run_dir: Path, snapshot: dict) -> dict:
    """The run's config: the snapshot's, else that of the run's newest checkpoint that has one."""
    if snapshot.get("config"):
        return snapshot["config"]
    for path in sorted((run_dir / "checkpoints").glob("*.ckpt"), reverse=True):
        config = read_checkpoint(path, verify=False).get("config")
        if config:
            return config
    raise UsageError(
        f"the snapshots in {run_dir / SNAPSHOT_FOLDER} record no run config and {run_dir / 'checkpoints'} holds no "
        "checkpoint with one: give the run folder train.py wrote"
    )


def posthoc_ema(run_dir: str | Path, sigma_rel: float, step: int | None = None) -> dict:
    """The export of the post-hoc EMA of width `sigma_rel` at `step` (default: the last snapshot's)."""
    run_dir = Path(run_dir)
    check_sigma_rel(sigma_rel, "--sigma-rel")
    if not run_dir.is_dir():
        raise UsageError(f"RUN_DIR {run_dir} is not a folder; give the run folder train.py wrote (outputs/<name>)")
    folder = run_dir / SNAPSHOT_FOLDER
    step, snapshots = choose_snapshots(list_snapshots(folder), step, folder)
    gamma = sigma_rel_to_gamma(sigma_rel)
    coefficients = solve_coefficients([s.step for s in snapshots], [s.gamma for s in snapshots], step, gamma)
    state, last = reconstruct(snapshots, coefficients)
    # dit.export's own function writes the result, so the file is an export whatever that format
    # becomes: the weights in the layout of a train.py checkpoint whose EMA they are.
    as_checkpoint = dict(
        state_dict={f"model.{k}": v for k, v in state.items()},
        current_model_state={},
        config=run_config_of(run_dir, last),
        global_step=step,
        manifest=last["manifest"].get("run"),
    )
    result = export(as_checkpoint, run_dir, "ema")
    result["manifest"]["posthoc_ema"] = dict(
        sigma_rel=sigma_rel,
        gamma=gamma,
        since=last["manifest"].get("since", 0),
        snapshots=[dict(file=s.path.name, coefficient=float(x)) for s, x in zip(snapshots, coefficients)],
    )
    return result


def main(argv: list[str] | None = None) -> Path:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder train.py wrote (it holds phema/)")
    parser.add_argument(
        "output", metavar="OUT.pt", help="where to write the export; an earlier export there is replaced"
    )
    parser.add_argument(
        "--sigma-rel",
        type=float,
        required=True,
        help=f"the EMA's width relative to the training time, in (0, {MAX_SIGMA_REL:.4f}); EDM2 tracks 0.05 and 0.10",
    )
    parser.add_argument(
        "--step", type=int, default=None, help="the step of a snapshot to rebuild at (default: the last)"
    )
    args = parser.parse_args(argv)
    run_dir, output = Path(args.run_dir), Path(args.output)
    if output.is_dir():  # before check_output, whose first check would call the run folder "the input checkpoint"
        raise UsageError(f"the output {output} is a folder; give a file path such as {output / 'ema.pt'}")
    check_output(run_dir, output)
    result = posthoc_ema(run_dir, args.sigma_rel, args.step)
    AtomicCheckpointIO().save_checkpoint(result, output)  # whole or not at all, synced to disk
    m = result["manifest"]
    p = m["posthoc_ema"]
    note = f"; tracking began at step {p['since']}, so it is approximate" if p["since"] else ""
    print(
        f"wrote the post-hoc EMA (sigma_rel {args.sigma_rel}, step {m['step']}, from {len(p['snapshots'])} "
        f"snapshots) of {describe_state_dict(result['ema'])} to {output}{note}"
    )
    return output


if __name__ == "__main__":
    exit_on_usage_error(main)
