"""`require_tags=true`: a multirun without tags is refused before its first job.

A scaling sweep of twelve jobs is found again on wandb by its tags (each run's `tags`, also in its
summary.json); lightning-hydra-template's `extras.enforce_tags` makes the same demand. Set
`require_tags: true` in conf/local/default.yaml to have it on one machine, or on the command line.
"""

import sys

from hydra.experimental.callback import Callback

from dit.errors import USAGE_EXIT_CODE


def swept_tags(overrides):
    """Whether the sweep's overrides give every job tags, e.g. 'tags=[a],[b]' (the sweep's own config
    keeps the default [] there)."""
    return any(
        o.split("=", 1)[0].lstrip("+~") == "tags" and o.split("=", 1)[1].strip() not in ("", "[]")
        for o in overrides
        if "=" in o
    )


class RequireTags(Callback):
    def on_multirun_start(self, config, **kwargs):
        if config.get("require_tags") and not config.get("tags") and not swept_tags(config.hydra.overrides.task):
            print(
                "error: require_tags=true and this multirun has no tags: add tags=[name,...] "
                "(e.g. tags=[scaling,v2]), or require_tags=false",
                file=sys.stderr,
            )
            sys.exit(USAGE_EXIT_CODE)
