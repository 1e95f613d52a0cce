"""How many threads torch (and OpenMP) should use: the decision, as a pure function, and its application.

Left to itself, torch starts one OpenMP thread per core of the machine, and OpenMP threads spin while they wait
for work. On a machine shared with other jobs that is the worst case: the spinning threads steal the cores the
working ones need (the demo ran four times slower beside another 2-thread job). The CLI therefore decides before
torch is imported (OpenMP reads ``OMP_NUM_THREADS`` and ``OMP_WAIT_POLICY`` once, at start):

* as many threads as cores available to this process (its CPU affinity and cgroup quota), divided among the
  processes of a ``torchrun`` launch on this machine;
* on a busy machine (the 1-minute load average says the other jobs leave less than a core free), one thread
  and passive OpenMP waiting; between the two, the cores the load leaves free;
* what the user set wins: ``--threads N`` over everything, then ``OMP_NUM_THREADS`` / ``OMP_WAIT_POLICY`` from
  the environment.

Torch-free: the CLI calls it before any heavy import.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    passive: bool  # set OMP_WAIT_POLICY=PASSIVE (threads sleep instead of spinning while they wait)
    reason: str  # why, in words, for the one line the CLI prints

    def line(self) -> str:
        wait = ", passive OpenMP waiting" if self.passive else ""
        return f"threads: {self.threads}{wait} ({self.reason})"


def choose_threads(
    cores: int, load: float | None, requested: int | None = None, env: Mapping[str, str] | None = None
) -> ThreadChoice:
    """The thread count for ``cores`` cores available to this process and a 1-minute ``load`` average
    (None: unknown). ``requested`` is ``--threads``; ``env`` the environment (``OMP_NUM_THREADS``,
    ``OMP_WAIT_POLICY`` set by the user are respected; ``LOCAL_WORLD_SIZE`` shares the cores among the
    processes of a launch)."""
    env = env or {}
    cores = max(1, cores)
    procs = max(1, _int(env.get("LOCAL_WORLD_SIZE")) or 1)
    share = max(1, cores // procs)
    free = None if load is None else cores - load
    busy = free is not None and free < 1
    passive = busy and "OMP_WAIT_POLICY" not in env
    why_passive = f"; machine busy: load {load:.1f} on {cores} cores" if passive else ""
    hint = "; --threads N to change"
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be at least 1, got {requested}")
        return ThreadChoice(requested, passive, f"from --threads{why_passive}")
    user = _int(env.get("OMP_NUM_THREADS"))
    if user:
        return ThreadChoice(user, passive, f"OMP_NUM_THREADS={user} from the environment{why_passive}{hint}")
    per = f" among {procs} processes" if procs > 1 else ""
    if free is None:
        return ThreadChoice(share, False, f"{cores} cores available{per}; load average unknown{hint}")
    if busy:
        return ThreadChoice(1, passive, f"machine busy: load {load:.1f} on {cores} cores{hint}")
    if free >= cores - 0.5:
        return ThreadChoice(share, False, f"{cores} cores available{per}, machine idle (load {load:.1f}){hint}")
    threads = max(1, min(share, math.floor(free) // procs))
    return ThreadChoice(
        threads, False, f"load {load:.1f} on {cores} cores leaves about {math.floor(free)} free{per}{hint}"
    )


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota when there is one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def thread_variables(choice: ThreadChoice, env: Mapping[str, str]) -> dict[str, str]:
    """The environment variables that carry ``choice`` to OpenMP and MKL (read once, when a process starts);
    an ``OMP_WAIT_POLICY`` the user set in ``env`` is kept. ``MKL_NUM_THREADS`` always follows the choice:
    torch takes its thread count from it when it is set, so a different value would run another count than
    the one the CLI prints."""
    variables = {"OMP_NUM_THREADS": str(choice.threads), "MKL_NUM_THREADS": str(choice.threads)}
    if choice.passive and "OMP_WAIT_POLICY" not in env:
        variables["OMP_WAIT_POLICY"] = "PASSIVE"
    return variables


def apply_threads(choice: ThreadChoice, env: dict[str, str] | None = None) -> None:
    """Make ``choice`` take effect: through the environment before torch is imported (OpenMP, MKL, faiss and
    DataLoader workers read it), and on torch itself when it already is."""
    env = os.environ if env is None else env
    env.update(thread_variables(choice, env))
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(choice.threads)


def _int(value: str | None) -> int:
    try:
        return max(0, int(value)) if value else 0
    except ValueError:
        return 0
