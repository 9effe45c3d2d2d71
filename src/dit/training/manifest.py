"""What made an output. A run folder, each sweep job, each export and each sample folder records
the settings, code and weights behind it, and every reuse (resume, a sweep's rerun, a sampler's
rerun, FID) compares them before it trusts what is there.

- `run_identity(config)`: the settings of a run config that decide what it trains; the rest
  (`LAUNCH_KEYS`: where it runs, how long, how it reports) may change from one launch to the next.
- `differences(old, new)`: the keys that differ, as one readable line.
- `weights_digest(state_dict)`: the identity of a set of weights, whatever file holds them.
- `code_version()`: the package, its git commit and the main libraries.
"""

import functools
import hashlib
import json
import os
import subprocess
from importlib import metadata
from pathlib import Path

import torch

MANIFEST_FILE = "manifest.json"

# Keys of a run config that may change between the launches of one run. A key listed here covers
# its children; RECIPE_KEYS below puts back the trainer settings that change the result.
LAUNCH_KEYS = (
    "name",
    "resume",
    "accept_changes",
    "output_dir",
    "shared_dir",
    "lock_run",
    "paths",  # where data and runs live (data.path, which is fixed, holds the one that matters)
    "tags",
    "require_tags",
    "print_config",
    "cpu_threads",
    "trainer",  # devices, strategy, max_steps, intervals (RECIPE_KEYS keeps precision)
    "logger",
    "launcher",
    "callbacks.progress_bar",
    "callbacks.checkpoint",
    "callbacks.stop_checkpoint",
    "callbacks.lr_monitor",
    "callbacks.fid",
    "callbacks.digits_accuracy",
    "callbacks.nonfinite_guard",
    "callbacks.throughput",
    "callbacks.rng_state",
    "callbacks.posthoc_ema",  # snapshots of averages that never feed back into training
    "module.model",
    "module.objective",  # the model and objective groups again (module.model: ${model})
    "module.compile",
    "module.sampling",
    "module.sampler",
    "sampler",  # the sample grids' sampler
    "data.num_workers",
    "data.cache_dir",
    "data.sample_classes",
    "data.samples_per_class",
    "data.prepare",
    "data.sample_batch_size",
    "data.pixels",
    "model.activation_checkpointing",
    "model.attention",  # the same function, computed another way
)
RECIPE_KEYS = (
    "trainer.precision",
    "trainer.gradient_clip_val",
    "trainer.gradient_clip_algorithm",
    "trainer.accumulate_grad_batches",
)
# Settings a run cannot change even on purpose: the checkpoint's weights have the model's shapes,
# its RNG states and the loader's position continue the seed's draws, and litdata refuses to
# continue a position in another folder. A different value is a new run (module.init_from=...).
FIXED_KEYS = (
    "model",
    "patch",
    "seed",
    "data.seed",
    "data.path",
    "data.channels",
    "data.latent_size",
    "data.num_classes",
)


def flatten(tree, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def _covered(key, prefixes):
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


# Keys added to the config after runs were made without them, with the value those runs had: a
# checkpoint that lacks one trained with this value (the paper's block, dit.models.BLOCK_DEFAULTS; no features).
IMPLIED_KEYS = {
    "model.rope": False,
    "model.mlp": "gelu",
    "model.norm": "layernorm",
    "model.qk_norm": False,
    "data.features": False,  # batches of (x, y): no encoder features
    "data.shuffle": True,
}


def run_identity(config):
    """The settings that decide what a run trains, as {dotted key: value}: the resolved run config
    (a plain dict) less LAUNCH_KEYS, plus RECIPE_KEYS, less the classes that implement a callback
    (the EMA's `_target_` differs on a TPU: the same average); IMPLIED_KEYS where it lacks them."""
    flat = flatten(config)
    if "model._target_" in flat:
        flat = IMPLIED_KEYS | flat
    return {
        k: v
        for k, v in flat.items()
        if (not _covered(k, LAUNCH_KEYS) or _covered(k, RECIPE_KEYS))
        and not (k.startswith("callbacks.") and k.endswith("_target_"))
    }


def fixed(keys):
    """Those of `keys` that FIXED_KEYS covers."""
    return [k for k in keys if _covered(k, FIXED_KEYS)]


def digest(value):
    """A short stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_keys(old, new):
    """The keys whose values differ between two flat dicts, a key on one side only included."""
    return sorted(k for k in old.keys() | new.keys() if k not in old or k not in new or old[k] != new[k])


def differences(old, new, limit=6):
    """'key: old -> new, ...' for the keys whose values differ (a key on one side only shows
    <unset> on the other), or '' when they agree."""

    def shown(side, k):
        return repr(side[k]) if k in side else "<unset>"

    keys = changed_keys(old, new)
    parts = [f"{k}: {shown(old, k)} -> {shown(new, k)}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return ", ".join(parts)


def weights_digest(state_dict):
    """sha256 of the weights' names, shapes, dtypes and bytes, in key order: the same weights give
    the same digest in a training checkpoint, an export or the official file."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")  # 0-dim too
    return h.hexdigest()[:16]


def checkout_root() -> Path:
    """The folder whose src/dit is this package (an editable install's checkout; for an installed
    wheel, two levels above site-packages/dit, which holds no .git)."""
    return Path(__file__).resolve().parents[1].parents[1]  # <root>/src/dit/training/manifest.py


@functools.cache
def code_version():
    """{"dit": version, "commit": git commit of this checkout (+dirty when tracked files changed) or
    None, "torch": ..., "lightning": ...}."""
    root = checkout_root()
    commit = None
    if (root / ".git").exists():
        try:
            run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=10, check=True)
            commit = run(["git", "-C", str(root), "rev-parse", "HEAD"]).stdout.strip()
            if run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"]).stdout.strip():
                commit += "+dirty"
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {
        "dit": _version("dit"),
        "commit": commit,
        "torch": str(torch.__version__),
        "lightning": _version("lightning"),
    }


def _version(package):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def read_manifest(folder):
    """The manifest of a folder, or None where it has none (or an unreadable one)."""
    path = Path(folder) / MANIFEST_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_manifest(folder, manifest):
    """Write `<folder>/manifest.json` whole or not at all (a temporary file, then a rename)."""
    path = Path(folder) / MANIFEST_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{MANIFEST_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path
