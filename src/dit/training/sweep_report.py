"""At the end of a multirun, list every job that failed with its overrides and its error.

Hydra runs the other jobs when one fails, then re-raises the first failure only; in a 12-job
scaling sweep the others would be lost in the scroll-back. This Hydra callback (conf/train.yaml,
hydra.callbacks) prints them all last, when the sweep's process exits. Rerunning the same sweep
with name=... resume=auto then finishes only what is missing.
"""

import atexit
import sys

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback

from dit.platform.compat import failed_job_error


class FailedJobsReport(Callback):
    def __init__(self):
        self.failed = []
        self.jobs = 0
        self.sweeping = False  # a single run's failure is reported by Hydra alone

    def on_multirun_start(self, config, **kwargs):
        self.sweeping = True

    def on_job_end(self, config, job_return, **kwargs):
        if not self.sweeping:
            return
        self.jobs += 1
        if job_return.status == JobStatus.FAILED:
            if not self.failed:
                atexit.register(self.report)
            error = failed_job_error(job_return)
            self.failed.append((" ".join(job_return.overrides), f"{type(error).__name__}: {error}".splitlines()[0]))

    def report(self):
        print(f"\n{len(self.failed)} of {self.jobs} jobs of the sweep failed:", file=sys.stderr)
        for overrides, error in self.failed:
            print(f"  {overrides}\n    -> {error}", file=sys.stderr)
