"""What the executor suite's pools run: a no-op and the three faults (cheap to import: every
pool's workers import it)."""

from __future__ import annotations

import os
import signal


def noop(x: int) -> int:
    return x


def spin(_: int = 0) -> None:
    """Never returns, at 100 % of a CPU (what a per-call timeout must stop)."""
    while True:
        pass


def segfault(_: int = 0) -> None:
    import ctypes

    ctypes.string_at(0)


def allocate(n_bytes: int) -> int:
    """Touch ``n_bytes`` of memory: past a memory limit, the OOM killer ends the process."""
    block = bytearray(n_bytes)
    for i in range(0, n_bytes, 4096):
        block[i] = 1
    return len(block)


def oom_killed(_: int = 0) -> None:
    """What the kernel's OOM killer does to a process of a pool without a memory limit of its
    own: SIGKILL (the peers have no memory limit to run into)."""
    os.kill(os.getpid(), signal.SIGKILL)
