"""Small Linux mechanics shared by the zygote and the worker (ctypes where Python 3.11 lacks).

Only what the zygote/worker birth needs: prctl, closing every fd but a few, thread count.
The isolation layers proper live in :mod:`sandbox.isolation`.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable

__all__ = ["PR_SET_CHILD_SUBREAPER", "PR_SET_PDEATHSIG", "close_fds_except", "prctl",
           "thread_count"]

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

# The running program's own symbols (libc among them): no ctypes.util, whose imports
# (subprocess, threading) would be in every zygote and so in every fork.
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """``prctl(2)``; raises OSError on failure."""
    rc: int = _prctl(option, arg2, arg3, arg4, arg5)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")
    return rc


def close_fds_except(keep: Iterable[int]) -> None:
    """Close every open file descriptor not in ``keep``.

    ``os.closerange`` is one ``close_range(2)`` system call per gap on Linux 5.9+ (a loop of
    ``close`` before), and touches no Python objects per descriptor: a listing of
    ``/proc/self/fd`` would cost a forked child a page fault per object it creates.
    """
    low = 0
    for fd in sorted(set(keep)):
        if fd > low:
            os.closerange(low, fd)
        low = max(low, fd + 1)
    os.closerange(low, _FD_CEILING)


#: Above any descriptor number a process can have (``fs.nr_open`` caps RLIMIT_NOFILE).
_FD_CEILING = 1 << 30


def thread_count() -> int:
    """Threads of this process, as the kernel counts them."""
    return len(os.listdir("/proc/self/task"))


def join_cgroups(procs_files: Iterable[str]) -> None:
    """Move the calling process into each cgroup by writing ``"0\\n"`` to its cgroup.procs
    (a freshly forked worker, before it runs any user code). Raises OSError."""
    for path in procs_files:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0\n")
        finally:
            os.close(fd)
