"""The DiT backbone (dit.py) with its block options (BLOCK_DEFAULTS), its Gflops (flops.py).
`from dit.models import DiT_models, DiT` as in the official code."""

from dit.models.dit import (
    BLOCK_DEFAULTS,
    CONDITIONINGS,
    SIZES,
    DiT,
    DiT_models,
    backbone_state_dict,
    config_name,
    describe_state_dict,
    infer_config,
)

__all__ = [
    "BLOCK_DEFAULTS",
    "CONDITIONINGS",
    "SIZES",
    "DiT",
    "DiT_models",
    "backbone_state_dict",
    "config_name",
    "describe_state_dict",
    "infer_config",
]
