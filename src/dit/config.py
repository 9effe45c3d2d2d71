"""The config groups of conf/ that the command-line tools share with train.py.

`python -m dit.sample` (and the FID tools) take the sampler as train.py does, `sampler=NAME` and
`sampler.KEY=VALUE`, composed from the same conf/sampler/ (and any group option registered in
Hydra's ConfigStore, as a plug-in sampler of one's own: docs/extending.md).
"""

from __future__ import annotations

from pathlib import Path

from dit.errors import UsageError

# The project's conf/ folder: beside src/ in a checkout (the README's editable install).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def is_override(arg: str) -> bool:
    """Whether a command-line word is a Hydra override (`sampler=ddim`, `sampler.steps=50`)."""
    key = arg.split("=", 1)[0]
    return "=" in arg and not arg.startswith("-") and key.replace(".", "").replace("_", "").isalnum()


def compose_groups(overrides: list[str], defaults: dict[str, str]) -> dict:
    """The groups `defaults` ({group: option}) of conf/, with `overrides` applied, as plain
    containers (each node still holds its `_target_`). A bad override is one UsageError."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not CONF_DIR.is_dir():
        raise UsageError(
            f"the config folder {CONF_DIR} is missing: install the project from its checkout (pip install -e .)"
        )
    known = {o.split("=", 1)[0].split(".")[0].lstrip("+~") for o in overrides}
    unknown = sorted(known - set(defaults))
    if unknown:
        raise UsageError(f"{unknown[0]}=...: this command takes overrides of {', '.join(sorted(defaults))} only")
    ConfigStore.instance().store(
        name="_dit_tool", node={"defaults": [{g: o} for g, o in defaults.items()] + ["_self_"]}
    )
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("_dit_tool", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise UsageError(f"{' '.join(overrides)}: {str(err).splitlines()[0]}") from None
    return OmegaConf.to_container(cfg, resolve=True)


def build(node: dict, what: str):
    """`hydra.utils.instantiate` of one composed node, a failure in one line naming `what`."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise UsageError(f"{what}: {str(cause).splitlines()[0]}") from None


def sampler_from(overrides: list[str], default: str = "ddpm"):
    """The sampler that `sampler=... sampler.KEY=...` overrides name (without `sampler=NAME`:
    conf/sampler/<default>.yaml)."""
    return build(compose_groups(overrides, {"sampler": default})["sampler"], "sampler")


def process_options(config: dict | None) -> dict:
    """What a sampler needs to know of the process a run trained on (DiTModule.diffusion_options),
    from the run's config as checkpoints and exports record it: its objective's `process_options`
    of `module.diffusion`. A config without an objective is the paper's (Hybrid)."""
    from dit.diffusion.objectives import Hybrid

    module = (config or {}).get("module") or {}
    objective = build(module["objective"], "module.objective") if module.get("objective") else Hybrid()
    return objective.process_options(module.get("diffusion") or {})
