"""How many CPU threads torch uses, chosen so that a shared machine does not collapse.

torch's own default is one intra-op thread per core. When other processes keep those cores busy,
OpenMP's threads wait for each other at every operation and small ops run many times slower
(``benchmarks/results/threads.md``, two shared cores: an MNIST MLP finetune epoch took 3.0 s with
one thread, 45 s with two; with two more busy processes 7.5 s against 134 s).
clafuse's default is half the cores this process may run on, at least one: on two cores one
thread, which loses little when the machine is idle and nothing when it is shared; ``--threads``
sets another count, and ``--threads 0`` leaves torch's own default.
"""

from __future__ import annotations

import os

from clafuse.options import check_integer


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """Half the usable cores, at least one."""
    return max(1, usable_cores() // 2)


def use_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count: ``threads`` (0 = torch's default of one per core), or
    :func:`default_threads` when None; return the count in use."""
    import torch

    if threads is not None:
        check_integer("--threads", threads, at_least=0, at_most=4096)
    wanted = default_threads() if threads is None else (usable_cores() if threads == 0 else threads)
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return torch.get_num_threads()
