"""torch's intra-op thread count for a run on the CPU.

torch starts one thread per core. On a machine that is already busy, its threads wait on each
other at every parallel region and the run thrashes: on a 2-core machine with another torch
process computing, 300 steps of the quickstart took 333 s with 2 threads and 62 s with one
(docs/benchmarks.md §11, "Threads on a busy laptop"). On a quiet machine one thread per core is the
fastest (37 s against 57 s there). `cpu_threads=auto` therefore takes the cores that the load
average leaves free, and never fewer than one. The 1-minute average lags: a run started within a
minute or so of other heavy work takes fewer threads than it could.
"""

from __future__ import annotations

import os

from dit.errors import UsageError


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def choose_cpu_threads(
    setting, processes: int = 1, cores: int | None = None, load: float | None = None
) -> tuple[int | None, str]:
    """(threads, why) for `cpu_threads=<setting>` in each of `processes` processes of this machine
    (DDP ranks on the CPU): an integer is taken as it is; auto leaves an OMP_NUM_THREADS the user
    set alone (None) and otherwise shares out the cores that the 1-minute load average leaves free."""
    if isinstance(setting, int) and not isinstance(setting, bool):
        if setting < 1:
            raise UsageError(f"cpu_threads must be auto or an integer of at least 1, got {setting!r}")
        return setting, f"cpu_threads={setting}"
    if setting != "auto":
        raise UsageError(f"cpu_threads must be auto or an integer of at least 1, got {setting!r}")
    if os.environ.get("OMP_NUM_THREADS"):
        return None, f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    cores = available_cores() if cores is None else cores
    load = os.getloadavg()[0] if load is None and hasattr(os, "getloadavg") else (load or 0.0)
    threads = max(1, min(cores, cores - round(load)) // max(1, processes))
    shared = f" shared by {processes} processes" if processes > 1 else ""
    return threads, f"{cores} cores{shared}, load average {load:.1f} from other work; cpu_threads=N to choose"
