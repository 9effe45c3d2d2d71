"""`require_tags=true`: a multirun without tags is refused before its first job.

A scaling sweep of twelve jobs is found again on wandb by its tags (each run's `tags`, also in its
summary.json); lightning-hydra-template's `extras.enforce_tags` makes the same demand. Set
`require_tags: true` in conf/local/default.yaml to have it on one machine, or on the command line.
"""

import sys

from hydra.experimental.callback import Callback

from dit.errors import USAGE_EXIT_CODE


class RequireTags(Callback):
    def on_multirun_start(self, config, **kwargs):
        if config.get("require_tags") and not config.get("tags"):
            print(
                "error: require_tags=true and this multirun has no tags: add tags=[name,...] "
                "(e.g. tags=[scaling,v2]), or require_tags=false",
                file=sys.stderr,
            )
            sys.exit(USAGE_EXIT_CODE)
