"""Helpers for the hostile suite: post-conditions checked from outside the sandbox.

The hostile suite runs many cases on one runtime per module, so the conftest's per-test
leftover guard (which would flag the runtime's own idle workers) is replaced by
:meth:`Watch.assert_clean`, run after every case: nothing of the invocation alive (by the
runtime's ``SANDBOX_INSTANCE`` environment mark, and by the names the functions give their
children), every worker cgroup but the live workers' removed, the pool back to size.
"""

from __future__ import annotations

import contextlib
import errno
import os
import textwrap
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psutil
from conftest import processes_with_env  # the suite's conftest (tests/), loaded first

from sandbox import Runtime

MiB = 1024 * 1024
#: Deadlock guard for deaths and cgroup removals the kernel finishes asynchronously.
SETTLE_S = 10.0
#: Some cases (births, kills, cgroup removal) race with a loaded 2-vCPU machine.
POLL_S = 0.005

#: Prepended to every hostile function: naming children, errno names, raw syscalls.
PRELUDE = textwrap.dedent('''
    import ctypes as _ct, errno as _errno, os as _os
    _libc = _ct.CDLL(None, use_errno=True)
    _libc.syscall.restype = _ct.c_long

    def name(tag):
        """Rename this process (its comm) so the test can find it from outside."""
        _libc.prctl(15, tag.encode(), 0, 0, 0)  # PR_SET_NAME

    def ename(code):
        return _errno.errorcode.get(code, str(code))

    def attempt(fn, *args, **kwargs):
        """'ok' or the errno name of the OSError fn raised."""
        try:
            fn(*args, **kwargs)
        except OSError as exc:
            return ename(exc.errno) if exc.errno else type(exc).__name__
        return "ok"

    def sysc(nr, *args):
        """A raw syscall: 'ok' or the errno name."""
        _ct.set_errno(0)
        rc = _libc.syscall(_ct.c_long(nr), *[_ct.c_long(a) for a in args])
        return "ok" if rc >= 0 else ename(_ct.get_errno())
''').lstrip()


def src(*parts: str) -> str:
    """A hostile function's source: the prelude, then each part dedented."""
    return PRELUDE + "".join("\n" + textwrap.dedent(part).lstrip() for part in parts)


def pids_named(name: str) -> list[int]:
    """Host pids of live processes whose comm is ``name`` (pids inside a sandbox differ)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() != name:
                        continue
                with open(f"/proc/{entry}/stat") as f:
                    if f.read().rpartition(")")[2].split()[0] == "Z":
                        continue
                found.append(int(entry))
            except OSError:
                pass
    return found


def wait_named(name: str, timeout: float = SETTLE_S) -> list[int]:
    """Wait (bounded) for a process named ``name`` to appear.

    Polls the process table: the kernel offers no event for "some process renamed itself".
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = pids_named(name)
        if found:
            return found
        time.sleep(POLL_S)
    raise AssertionError(f"no process named {name!r} within {timeout} s")


def marked(mark: str) -> set[int]:
    """Live pids whose environment holds exactly ``SANDBOX_INSTANCE=<mark>`` (a prefix of the
    value when ``mark`` ends with ``/``)."""
    needle = f"SANDBOX_INSTANCE={mark}".encode()
    return processes_with_env(needle if mark.endswith("/") else needle + b"\0")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def wait_dead(pids: Iterable[int], timeout: float = SETTLE_S) -> list[int]:
    """Wait (bounded) for every pid to exit; returns those still alive (zombies are dead)."""
    deadline = time.monotonic() + timeout
    left = []
    for pid in pids:
        try:
            psutil.Process(pid).wait(timeout=max(0.0, deadline - time.monotonic()))
        except psutil.NoSuchProcess:
            continue
        except psutil.TimeoutExpired:
            if alive(pid):
                left.append(pid)
    return left


def sigkill_all(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, 9)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


@dataclass
class Watch:
    """Post-conditions of one runtime, checked from outside after every case."""

    rt: Runtime
    samples: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def instance(self) -> str:
        return self.rt.async_runtime.instance

    def layer(self, name: str) -> bool:
        layers = self.rt.info()["isolation"]["layers"]
        return bool(layers.get(name, {}).get("enabled"))

    def cgroup_parents(self) -> tuple[str, ...]:
        manager = self.rt.async_runtime._host.cgroups
        return tuple(manager.paths) if manager is not None else ()

    def _live(self) -> tuple[set[int], set[str]]:
        """(pids, cgroup names) of the runtime's zygotes and live workers, read in its loop."""
        def snapshot() -> tuple[set[int], set[str]]:
            pids: set[int] = set()
            names: set[str] = set()
            for pool in self.rt.async_runtime._pools.values():
                if pool.zygote is not None:
                    pids.update(pool.zygote.pids)
                for worker in pool.workers:
                    if worker.alive:
                        pids.add(worker.pid)
                        if worker.cgroup is not None:
                            names.add(worker.cgroup.name)
                for spare in pool.spare_cgroups:
                    # kept for the next birth: only ever an empty group
                    assert spare.is_empty() and not spare.pids(), spare
                    names.add(spare.name)
            return pids, names

        result: tuple[set[int], set[str]] = self.rt._in_loop(snapshot)
        return result

    def worker_cgroups(self) -> set[str]:
        """Worker group names present under the runtime's parent groups (all hierarchies)."""
        names: set[str] = set()
        for parent in self.cgroup_parents():
            with contextlib.suppress(FileNotFoundError):
                names.update(e.name for e in os.scandir(parent) if e.is_dir())
        return names

    def assert_clean(self, *, names: Iterable[str] = (), worker_pid: int | None = None,
                     case: str = "") -> None:
        """Everything the last invocation made is gone; the pool is back to size."""
        self.rt.wait_warm(timeout=60)
        named = [pid for name in names for pid in pids_named(name)]
        left = wait_dead(named)
        assert not left, f"{case}: processes named {list(names)} survived: {left}"
        if worker_pid is not None:
            assert not wait_dead([worker_pid]), f"{case}: worker {worker_pid} survived"
        # Deaths and cgroup removals finish asynchronously (the pool retries rmdir with
        # back-off; cgroupfs v1 has no event for it): poll, bounded.
        deadline = time.monotonic() + SETTLE_S
        while True:
            pids, groups = self._live()
            extra_pids = marked(self.instance) - pids
            extra_groups = self.worker_cgroups() - groups
            if not extra_pids and not extra_groups:
                break
            if time.monotonic() > deadline:
                details = {p: psutil.Process(p).name() for p in extra_pids if alive(p)}
                raise AssertionError(f"{case}: left behind: processes {details}, "
                                     f"cgroups {sorted(extra_groups)}")
            time.sleep(POLL_S)
        self.samples.append((case, fd_count(), rss_bytes()))

    def assert_flat(self, *, warmup: int = 5, fd_slack: int = 4, rss_slack: int = 48 * MiB
                    ) -> str:
        """Supervisor fd count and RSS did not grow across the batch (after a warm-up)."""
        assert len(self.samples) > warmup + 5, f"too few samples: {len(self.samples)}"
        base = self.samples[warmup]
        last = self.samples[-1]
        peak_fd = max(s[1] for s in self.samples[warmup:])
        assert last[1] <= base[1] + fd_slack, (
            f"fd count grew from {base[1]} (after {base[0]}) to {last[1]} (after {last[0]})")
        assert peak_fd <= base[1] + fd_slack + 8, f"fd count peaked at {peak_fd}"
        assert last[2] <= base[2] + rss_slack, (
            f"RSS grew from {base[2] // MiB} MiB (after {base[0]}) to {last[2] // MiB} MiB "
            f"(after {last[0]})")
        return (f"{len(self.samples)} cases: fds {base[1]} -> {last[1]}, RSS "
                f"{base[2] // MiB} -> {last[2] // MiB} MiB")


def short_tag(prefix: str) -> str:
    """A unique process name of at most 15 characters (the kernel truncates comm there)."""
    tag = f"{prefix[:5]}{os.urandom(4).hex()}"
    assert len(tag) <= 15
    return tag


def host_ns_ids(pid: int | str = "self") -> dict[str, int]:
    out = {}
    for name in ("mnt", "pid", "net", "ipc", "uts", "user", "cgroup"):
        out[name] = os.stat(f"/proc/{pid}/ns/{name}").st_ino
    return out


def expect_errnos(got: dict[str, Any], allowed: dict[str, set[str]] | set[str]) -> None:
    """Every attempt in ``got`` failed with one of the allowed errno names."""
    for key, value in got.items():
        ok = allowed[key] if isinstance(allowed, dict) else allowed
        assert value in ok, f"{key}: got {value!r}, expected one of {sorted(ok)}"
