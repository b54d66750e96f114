"""Linux control groups for workers: detect, create, limit, account, kill, remove.

This module knows cgroupfs and nothing else (no pools, no gRPC). Every call is a handful of
syscalls on cgroupfs files (tens of µs); nothing here sleeps. Two exceptions, both bounded:
:meth:`WorkerCgroup.kill_all` without ``cgroup.kill`` spins (yielding the CPU) up to 20 ms for a
freeze to settle and up to 20 ms more for signal rounds; the calls that tear down whole trees
(:meth:`CgroupManager.close`, :meth:`CgroupManager.sweep_stale`) wait on pidfds, up to their
``timeout_s``, for the processes they have just SIGKILLed to exit.

Layout
------
Everything is created under *our own* cgroup (read from ``/proc/self/cgroup``), so nested
deployments work and the limit of the cgroup we were started in still covers our workers::

    <own cgroup>/                          e.g. memory:/process_api/<id>, pids:/, 0::/app
    ├── supervisor/                        v2 only, and only if needed: see "v2" below
    └── <prefix>-<pid>-<hex>/              one per CgroupManager ("M"), in each hierarchy used
        ├── <worker name>/                 one per WorkerCgroup (a leaf; processes live here)
        └── ...

``<pid>`` is the supervisor's pid, so :meth:`CgroupManager.sweep_stale` can tell the groups of a
dead supervisor (pid no longer alive) from live ones, among our siblings and at the top level
of each hierarchy.

A freshly forked worker joins its groups itself, before running any user code, by writing
``"0\\n"`` (meaning "the calling process", in v1 as in v2, tested) into each path of
:meth:`WorkerCgroup.procs_files` (:func:`join` does exactly that); or the supervisor writes the
worker's pid there. Joining moves the whole thread group. The group used for killing is joined
first, so a process that is in any of our groups is killable through it.

Controllers and files
---------------------
==============  ==================================  =====================================
need            cgroup v1                           cgroup v2
==============  ==================================  =====================================
hierarchies     one per controller (or co-mounted   one, ``/sys/fs/cgroup``; controllers
                set), ``/sys/fs/cgroup/<ctl>``      enabled per level in subtree_control
memory limit    memory.limit_in_bytes ("-1") and    memory.max ("max"), memory.swap.max
                memory.memsw.limit_in_bytes         ("0" under a limit)
                (kept >= memory, so order matters)
OOM killer      memory.oom_control                  always on
                (oom_kill_disable must be 0)
OOM kills       "oom_kill N" in memory.oom_control  "oom_kill N" in memory.events
usage / peak    memory.usage_in_bytes /             memory.current / memory.peak
                memory.max_usage_in_bytes           (per-fd reset since 6.12)
processes       pids.max, pids.current              same
cpu time        cpuacct.usage (ns)                  cpu.stat usage_usec (every cgroup)
kill all        freezer.state FROZEN, SIGKILL       cgroup.kill (5.14+); else cgroup.freeze
                each task, THAWED                   1, SIGKILL, 0
empty?          cgroup.procs of the tree            cgroup.events "populated 0"
==============  ==================================  =====================================

Hybrid machines (v1 controllers plus a controller-less cgroup2 mount at
``/sys/fs/cgroup/unified``, this project's CI) get the best of both: limits and accounting
from v1, and ``cgroup.kill`` from a group in the unified hierarchy, which kills a whole tree
in one write, race-free against forks (40 to 70 µs here), where the v1 freezer needs every
task to get a CPU before the freeze settles (1 ms for one idle task, 6 ms for a busy one, 60 ms
for 8 busy ones on 2 loaded vCPUs) and a frozen task cannot die before it is thawed.
``kill_method`` chooses explicitly.

v2 "no internal processes": a non-root v2 cgroup that has processes cannot enable controllers
for its children (EBUSY). If our own cgroup is in that state, the manager moves *our own
process* into a leaf ``<own>/supervisor`` and retries (``move_self=False`` disables that). When
other processes share our cgroup this still fails, and the report says so.

Measured facts this module relies on (Linux 6.x; see SECURITY.md):

* A cgroup OOM is a SIGKILL and the oom_kill counter rises by exactly one per kill: classify by
  the delta of :meth:`WorkerCgroup.oom_kills`. ``memory.failcnt`` is useless for this.
* ``pids.max`` binds root too (fork fails with EAGAIN). Zombies count in pids.current until
  reaped, but they are not listed in cgroup.procs (v1 and v2), and rmdir succeeds while one
  remains: a group can be removed once its processes have *exited*, reaped or not.
* A SIGKILLed process takes 0.5 to 10 ms to exit here, so :meth:`WorkerCgroup.remove` right
  after :meth:`WorkerCgroup.kill_all` usually returns False; retry after the worker's pidfd
  fires. create takes about 200 µs and remove about 100 µs for 4 hierarchies.
* Migrating a process into a cgroup (the join) can take 5 to 30 ms when no migration happened
  in the last few ms (an RCU grace period on the global threadgroup rwsem); back to back it
  takes 20 to 150 µs. Keep joins on the pre-fork path.

Containment assumes the worker cannot write to cgroupfs (it runs as another uid or in a mount
namespace without it): a root process that can write there could move itself out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import secrets
import select
import signal
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from sandbox import _linux
from sandbox._logging import get_logger
from sandbox.errors import IsolationUnavailable

__all__ = [
    "KILL_METHODS",
    "SUPERVISOR_LEAF",
    "CgroupManager",
    "CgroupReport",
    "KillMethod",
    "WorkerCgroup",
    "detect",
    "join",
]

log = get_logger(__name__)

KillMethod = Literal["auto", "cgroup.kill", "freezer", "signals"]
#: Strongest first. ``auto`` takes the strongest available.
KILL_METHODS: Final[tuple[str, ...]] = ("cgroup.kill", "freezer", "signals")
#: The v2 leaf our own process moves into when its cgroup must stay free of processes.
SUPERVISOR_LEAF: Final = "supervisor"

_MOUNTINFO: Final = "/proc/self/mountinfo"
_SELF_CGROUP: Final = "/proc/self/cgroup"
_PREFIX_RE: Final = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*")
_O_READ: Final = os.O_RDONLY | os.O_CLOEXEC
_O_WRITE: Final = os.O_WRONLY | os.O_CLOEXEC
# Roles a worker group may have; each maps to one directory (several roles may share one).
_V1_CONTROLLER: Final = {"memory": "memory", "pids": "pids", "cpu": "cpuacct", "freezer": "freezer"}
# Order in which a worker joins its directories: the kill group first.
_JOIN_ORDER: Final = ("unified", "freezer", "pids", "memory", "cpu")
# Where tasks are listed from (v1 pids hierarchy first, as it also bounds the count).
_LIST_ORDER: Final = ("pids", "memory", "unified", "freezer", "cpu")
# Busy budgets, not sleeps: how long kill_all may spin (yielding the CPU) for a freeze to
# settle, or for the signal rounds to see an empty group, before returning False.
_SETTLE_BUDGET_S: Final = 0.02
_ROUNDS_BUDGET_S: Final = 0.02
_V1_UNLIMITED: Final = b"-1"


# --------------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True)
class CgroupReport:
    """What cgroup support this machine (or a manager) has.

    Attributes:
        version: 1 (any resource controller on a v1 hierarchy, including hybrid machines),
            2 (pure v2), or None (no usable cgroupfs).
        memory: memory limit, usage, peak and OOM counting work.
        pids: a process-count limit works.
        cpu: CPU-time accounting works.
        freeze: a race-free kill of a whole group works (v1 freezer, v2 cgroup.kill or
            cgroup.freeze); without it :meth:`WorkerCgroup.kill_all` falls back to rounds of
            signals.
        reason: "" when everything above is available; otherwise what is missing and why.
        kill_method: how :meth:`WorkerCgroup.kill_all` kills: "cgroup.kill", "freezer",
            "signals", or "" when there are no cgroups at all.
    """

    version: int | None
    memory: bool
    pids: bool
    cpu: bool
    freeze: bool
    reason: str
    kill_method: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (for the isolation report, CLI and logs)."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Small cgroupfs helpers: each is one open, one read or write, one close.


def _read(path: str, size: int = 4096) -> bytes:
    fd = os.open(path, _O_READ)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def _read_all(path: str) -> bytes:
    fd = os.open(path, _O_READ)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, _O_WRITE)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _keyed(data: bytes, key: bytes) -> int | None:
    """The integer after ``key`` in a flat-keyed file ("oom_kill 3\\n..."), or None."""
    for line in data.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            return int(parts[1])
    return None


def _subdirs(path: str) -> list[str]:
    with os.scandir(path) as it:
        return [entry.path for entry in it if entry.is_dir(follow_symlinks=False)]


def _tasks(top: str) -> list[int]:
    """Every process (thread-group id) in ``top`` and its descendants."""
    pids = [int(x) for x in _read_all(top + "/cgroup.procs").split()]
    for sub in _subdirs(top):
        pids.extend(_tasks(sub))
    return pids


def _sigkill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rmtree(path: str) -> None:
    """rmdir ``path`` bottom-up. Raises OSError (EBUSY while a process is inside)."""
    try:
        os.rmdir(path)
        return
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        subs = _subdirs(path)
        if not subs:
            raise
    for sub in subs:
        _rmtree(sub)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)


def _wait_exit(pids: Iterable[int], deadline: float) -> bool:
    """Wait (on pidfds, bounded by ``deadline``) until every pid has exited. Not a reap."""
    fds: list[int] = []
    try:
        for pid in set(pids):
            with contextlib.suppress(ProcessLookupError):
                fds.append(os.pidfd_open(pid))
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        pending = len(fds)
        while pending:
            timeout_ms = max(0, int((deadline - time.monotonic()) * 1000))
            events = poller.poll(timeout_ms)
            if not events:
                return False
            for fd, _ in events:
                poller.unregister(fd)
                pending -= 1
        return True
    finally:
        for fd in fds:
            os.close(fd)


def _kernel_at_least(major: int, minor: int) -> bool:
    match = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return match is not None and (int(match[1]), int(match[2])) >= (major, minor)


def _check_name(value: str, what: str) -> None:
    if (
        not isinstance(value, str)
        or value in ("", ".", "..")
        or any(c in value for c in "/\0\n")
        or (what == "prefix" and not _PREFIX_RE.fullmatch(value))
    ):
        raise ValueError(
            f"invalid cgroup {what} {value!r}: "
            + ("use letters, digits, '_', '.', '-'" if what == "prefix" else "not a file name")
        )


def join(procs_files: Iterable[str]) -> None:
    """Move the calling process into each cgroup by writing ``"0\\n"`` to its cgroup.procs.

    Meant for a freshly forked worker, before it runs any user code. Raises OSError.
    """
    _linux.join_cgroups(procs_files)


# --------------------------------------------------------------------------------------------
# Detection


@dataclass(frozen=True)
class _Hierarchy:
    version: int  # 1 or 2
    mount: str  # mount point: the top level of this hierarchy as we see it
    own: str  # our own cgroup's directory in it
    controllers: frozenset[str]  # v1: mounted controllers; v2: own cgroup.controllers
    problem: str = ""  # why it is unusable, "" if usable
    can_kill: bool = False  # v2: cgroup.kill
    can_freeze: bool = False  # v2: cgroup.freeze


@dataclass(frozen=True)
class _Layout:
    v1: Mapping[str, _Hierarchy]  # v1 controller name -> hierarchy
    v2: _Hierarchy | None
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Plan:
    roles: Mapping[str, _Hierarchy]
    kill_method: str
    problems: tuple[str, ...]


@dataclass(frozen=True)
class _Mount:
    root: str
    point: str
    fstype: str
    options: frozenset[str]
    read_only: bool


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def _parse_mountinfo(text: str) -> list[_Mount]:
    mounts = []
    for line in text.splitlines():
        parts = line.split()
        if "-" not in parts[6:]:
            continue
        sep = parts.index("-", 6)
        if len(parts) < sep + 4 or parts[sep + 1] not in ("cgroup", "cgroup2"):
            continue
        super_opts = frozenset(parts[sep + 3].split(","))
        read_only = "ro" in parts[5].split(",") or "ro" in super_opts
        mounts.append(
            _Mount(_unescape(parts[3]), _unescape(parts[4]), parts[sep + 1], super_opts, read_only)
        )
    return mounts


def _parse_self_cgroup(text: str) -> dict[str, str]:
    """Controller name (``""`` for the v2 hierarchy) -> our cgroup path in it."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            paths[""] = parts[2]
        for ctl in parts[1].split(","):
            if ctl:
                paths[ctl] = parts[2]
    return paths


def _own_dir(mount: _Mount, path: str) -> str | None:
    root = mount.root.rstrip("/")
    if root and path != root and not path.startswith(root + "/"):
        return None
    rel = path[len(root) :].strip("/")
    return os.path.join(mount.point, rel) if rel else mount.point


def _usable(mount: _Mount, own: str) -> str:
    if mount.read_only:
        return f"{mount.point} is mounted read-only"
    if not os.path.isdir(own):
        return f"our cgroup {own} does not exist"
    if not os.access(own, os.W_OK):
        return f"{own} is not writable (uid {os.getuid()})"
    return ""


def _hierarchy(mounts: list[_Mount], path: str | None, version: int, what: str) -> _Hierarchy:
    if path is None:
        return _Hierarchy(
            version, mounts[0].point, "", frozenset(), f"{what}: not in /proc/self/cgroup"
        )
    found = [(m, own) for m in mounts if (own := _own_dir(m, path)) is not None]
    if not found:
        return _Hierarchy(
            version, mounts[0].point, "", frozenset(), f"{what}: our cgroup {path} is not visible"
        )
    found.sort(key=lambda mo: (mo[0].read_only, not os.path.isdir(mo[1])))
    mount, own = found[0]
    problem = _usable(mount, own)
    if version == 1:
        return _Hierarchy(
            1, mount.point, own, mount.options, f"{what}: {problem}" if problem else ""
        )
    try:
        controllers = frozenset(_read(own + "/cgroup.controllers").decode().split())
    except OSError:
        controllers = frozenset()
    # The root cgroup has neither cgroup.kill nor cgroup.freeze, its children do.
    non_root = os.path.exists(own + "/cgroup.type")
    can_kill = os.path.exists(own + "/cgroup.kill") if non_root else _kernel_at_least(5, 14)
    can_freeze = os.path.exists(own + "/cgroup.freeze") if non_root else _kernel_at_least(5, 2)
    return _Hierarchy(
        2,
        mount.point,
        own,
        controllers,
        f"{what}: {problem}" if problem else "",
        can_kill,
        can_freeze,
    )


def _probe(mountinfo: str | None = None, self_cgroup: str | None = None) -> _Layout:
    """Read the cgroup mounts and our place in them. No side effects."""
    try:
        if mountinfo is None:
            mountinfo = _read_all(_MOUNTINFO).decode()
        if self_cgroup is None:
            self_cgroup = _read_all(_SELF_CGROUP).decode()
    except OSError as exc:
        return _Layout({}, None, (f"cannot read /proc: {exc}",))
    mounts = _parse_mountinfo(mountinfo)
    paths = _parse_self_cgroup(self_cgroup)
    v1: dict[str, _Hierarchy] = {}
    for ctl in _V1_CONTROLLER.values():
        ctl_mounts = [m for m in mounts if m.fstype == "cgroup" and ctl in m.options]
        if ctl_mounts:
            v1[ctl] = _hierarchy(ctl_mounts, paths.get(ctl), 1, f"v1 {ctl}")
    v2_mounts = [m for m in mounts if m.fstype == "cgroup2"]
    v2 = _hierarchy(v2_mounts, paths.get(""), 2, "v2") if v2_mounts else None
    problems = () if mounts else ("no cgroup filesystem is mounted",)
    return _Layout(v1, v2, problems)


def _plan(layout: _Layout, kill_method: str = "auto") -> _Plan:
    """Which hierarchy serves each role, and how to kill."""
    if kill_method != "auto" and kill_method not in KILL_METHODS:
        raise ValueError(f"invalid kill_method {kill_method!r}: use auto or one of {KILL_METHODS}")
    problems = list(layout.problems)
    v2 = layout.v2
    if v2 is not None and v2.problem:
        problems.append(v2.problem)
        v2 = None
    roles: dict[str, _Hierarchy] = {}
    for role, ctl in _V1_CONTROLLER.items():
        h = layout.v1.get(ctl)
        if h is not None and not h.problem:
            roles[role] = h
        elif v2 is not None and (
            (role in ("memory", "pids") and ctl in v2.controllers)
            or role == "cpu"
            or (role == "freezer" and v2.can_freeze)
        ):
            roles[role] = v2
        elif h is not None:
            problems.append(h.problem)
        elif v2 is not None and role != "freezer":
            problems.append(f"{role}: not delegated to {v2.own} (not in its cgroup.controllers)")
        elif role != "freezer" and (layout.v1 or (layout.v2 and not layout.v2.problem)):
            problems.append(f"{role}: controller not mounted")
    wanted = (
        KILL_METHODS if kill_method == "auto" else KILL_METHODS[KILL_METHODS.index(kill_method) :]
    )
    method = "signals"
    for candidate in wanted:
        if (candidate == "cgroup.kill" and v2 is not None and v2.can_kill) or (
            candidate == "freezer" and "freezer" in roles
        ):
            method = candidate
            break
    if method == "cgroup.kill" and v2 is not None:
        roles["unified"] = v2
    if method != "freezer" and "freezer" in roles and roles["freezer"].version == 1:
        del roles["freezer"]  # do not create v1 freezer groups nobody uses
    if method == "signals" and roles:
        problems.append(
            "freeze: no cgroup.kill, cgroup.freeze or v1 freezer"
            if kill_method in ("auto", "cgroup.kill", "freezer")
            else "freeze: not used (kill_method='signals')"
        )
    return _Plan(roles, method if roles else "", tuple(problems))


def _make_report(
    version_of: Iterable[int], roles: Iterable[str], method: str, problems: Iterable[str]
) -> CgroupReport:
    versions = set(version_of)
    role_set = set(roles)
    return CgroupReport(
        version=1 if 1 in versions else (2 if 2 in versions else None),
        memory="memory" in role_set,
        pids="pids" in role_set,
        cpu="cpu" in role_set,
        freeze=method in ("cgroup.kill", "freezer"),
        reason="; ".join(dict.fromkeys(p for p in problems if p)),
        kill_method=method,
    )


def detect() -> CgroupReport:
    """What cgroup support is available to us here. Cheap, no side effects, never raises."""
    try:
        return _report_of(_plan(_probe()))
    except Exception as exc:  # a report must never crash start-up
        log.warning("cgroup detection failed: %s", exc)
        return CgroupReport(None, False, False, False, False, f"detection failed: {exc}")


def _report_of(plan: _Plan) -> CgroupReport:
    return _make_report(
        (h.version for h in plan.roles.values()), plan.roles, plan.kill_method, plan.problems
    )


# --------------------------------------------------------------------------------------------
# Groups


@dataclass(frozen=True)
class _Dir:
    path: str
    version: int


#: A recycled group may still hold this much charged memory (kernel objects a dead worker
#: left, freed lazily); more (page cache) would count against the next worker's limit.
_RECYCLE_MAX_CHARGE: Final = 1024 * 1024


class WorkerCgroup:
    """One worker's group: the same name in every hierarchy in use.

    Created by :meth:`CgroupManager.create`. Not thread-safe; meant for one event loop.
    """

    def __init__(self, name: str, dirs: Mapping[str, _Dir], kill_method: str) -> None:
        self.name = name
        self._dirs = dict(dirs)
        self._kill_method = kill_method
        self._paths = tuple(dict.fromkeys(dirs[r].path for r in _JOIN_ORDER if r in dirs))
        lister = next((dirs[r] for r in _LIST_ORDER if r in dirs), None)
        self._list_dir = lister.path if lister is not None else None
        self._removed: set[str] = set()
        # Last value written per file; a fresh group is unlimited everywhere.
        self._written: dict[str, bytes] = {}
        self._mem_limit: int | None = None
        self._mem_limit_known = True
        self._memsw: bool | None = None  # v1 memory.memsw.* present (decided on first use)
        self._peak_fd: int | None = None
        self._peak_resettable = True
        # Counters the kernel cannot reset, as they stood when the group was last recycled.
        self._oom_base = 0
        self._cpu_base = 0.0
        self.recycled = 0
        mem = dirs.get("memory")
        if mem is not None:
            if mem.version == 1:
                self._written[mem.path + "/memory.limit_in_bytes"] = _V1_UNLIMITED
                self._written[mem.path + "/memory.memsw.limit_in_bytes"] = _V1_UNLIMITED
            else:
                self._written[mem.path + "/memory.max"] = b"max"
                self._written[mem.path + "/memory.swap.max"] = b"max"
        pids = dirs.get("pids")
        if pids is not None:
            self._written[pids.path + "/pids.max"] = b"max"

    def __repr__(self) -> str:
        return (
            f"WorkerCgroup({self.name!r}, kill_method={self._kill_method!r}, paths={self._paths})"
        )

    @property
    def paths(self) -> tuple[str, ...]:
        """The group's directory in each hierarchy, in join order."""
        return self._paths

    @property
    def kill_method(self) -> str:
        """How :meth:`kill_all` kills: "cgroup.kill", "freezer" or "signals"."""
        return self._kill_method

    def procs_files(self) -> list[str]:
        """The cgroup.procs files a worker writes ``"0\\n"`` (itself) or its pid into to join.

        The kill group comes first. See :func:`join`.
        """
        return [path + "/cgroup.procs" for path in self._paths]

    # -- limits ---------------------------------------------------------------------------

    def set_limits(self, *, memory_bytes: int | None, max_pids: int | None) -> None:
        """Set the memory and process-count limits; None is unlimited.

        Writes only what changed since the last call. v1: memory.memsw.limit_in_bytes follows
        memory.limit_in_bytes (the kernel wants memsw >= memory at every step, so it is written
        first when raising and last when lowering). v2: memory.swap.max is 0 under a limit.

        A limit whose controller is missing (``report.memory`` / ``report.pids`` said so when
        the manager was created) is not applied, and that is not an error here.

        Raises:
            ValueError: a limit is not a positive int.
            OSError: the kernel refused (e.g. EBUSY: usage above a lowered v1 memory limit).
        """
        for what, value in (("memory_bytes", memory_bytes), ("max_pids", max_pids)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value <= 0
            ):
                raise ValueError(f"invalid {what} {value!r}: must be a positive int or None")
        mem = self._dirs.get("memory")
        if mem is not None:
            if mem.version == 1:
                self._set_v1_memory(mem.path, memory_bytes)
            else:
                limit = b"max" if memory_bytes is None else b"%d" % memory_bytes
                self._put(mem.path + "/memory.max", limit)
                swap = b"max" if memory_bytes is None else b"0"
                try:
                    self._put(mem.path + "/memory.swap.max", swap)
                except FileNotFoundError:  # no swap accounting: nothing to bound
                    self._written[mem.path + "/memory.swap.max"] = swap
        pids = self._dirs.get("pids")
        if pids is not None:
            self._put(pids.path + "/pids.max", b"max" if max_pids is None else b"%d" % max_pids)

    def _put(self, path: str, value: bytes) -> None:
        if self._written.get(path) == value:
            return
        self._written.pop(path, None)  # unknown until the write succeeds
        _write(path, value)
        self._written[path] = value

    def _set_v1_memory(self, path: str, limit: int | None) -> None:
        mem_file = path + "/memory.limit_in_bytes"
        memsw_file = path + "/memory.memsw.limit_in_bytes"
        value = _V1_UNLIMITED if limit is None else b"%d" % limit
        if self._memsw is None:
            self._memsw = os.path.exists(memsw_file)
        if not self._memsw:
            self._put(mem_file, value)
            return
        if self._mem_limit_known:
            current = self._mem_limit
        else:
            kernel = int(_read(mem_file))
            current = None if kernel >= 2**62 else kernel
        raising = limit is None or (current is not None and limit > current)
        try:
            if raising:
                self._put(memsw_file, value)
                self._put(mem_file, value)
            else:
                self._put(mem_file, value)
                self._put(memsw_file, value)
        except OSError:
            self._mem_limit_known = False
            raise
        self._mem_limit, self._mem_limit_known = limit, True

    # -- membership -----------------------------------------------------------------------

    def pids(self) -> list[int]:
        """Every process in the group (and any sub-group), from the v1 pids hierarchy if there
        is one, else memory, else the v2 group. Zombies are not listed. [] if removed."""
        if self._list_dir is None:
            return []
        try:
            return sorted(_tasks(self._list_dir))
        except FileNotFoundError:
            return []

    def is_empty(self) -> bool:
        """No live process in the group (zombies do not count)."""
        v2 = self._dirs.get("unified") or next(
            (d for d in self._dirs.values() if d.version == 2), None
        )
        if v2 is not None:  # "populated" covers sub-groups and ignores zombies: one read
            try:
                return _keyed(_read(v2.path + "/cgroup.events"), b"populated") == 0
            except FileNotFoundError:
                return True
        pids = self._dirs.get("pids")
        if pids is not None:
            try:  # cheap shortcut: pids.current counts zombies too, so only 0 is conclusive
                if int(_read(pids.path + "/pids.current")) == 0:
                    return True
            except FileNotFoundError:
                return True
        return not self.pids()

    # -- killing --------------------------------------------------------------------------

    def kill_all(self) -> bool:
        """SIGKILL every process in the group, race-free against forks.

        Does not wait for the processes to be reaped (they may be somebody else's zombies).
        ``cgroup.kill``: one write; the kernel also kills children being forked at that moment.
        ``freezer``: freeze, spin (yielding the CPU) until the freeze has settled, SIGKILL
        every task listed, thaw; a settled frozen tree cannot fork, so the list is complete.
        ``signals``: rounds of list-and-kill until the group is empty.

        Returns:
            True when every process has been sent SIGKILL and none can fork any more. False
            when a time budget ran out first: a freeze that did not settle within
            ``_SETTLE_BUDGET_S`` (every task must get a CPU to freeze, which took 60 ms for 8
            busy tasks on 2 loaded vCPUs), then signal rounds that did not see the group empty
            within ``_ROUNDS_BUDGET_S``. Everything listed was killed anyway; call again later
            (as before retrying :meth:`remove`) to catch a child forked in the race.
        """
        if self._kill_method == "cgroup.kill":
            try:
                _write(self._dirs["unified"].path + "/cgroup.kill", b"1")
                return True
            except FileNotFoundError:
                return True
            except OSError as exc:
                log.warning("cgroup.kill of %s failed (%s); killing by signals", self.name, exc)
        elif self._kill_method == "freezer":
            try:
                if self._kill_frozen():
                    return True
                log.debug("freezing %s did not settle in time; killing by signals", self.name)
            except FileNotFoundError:
                return True
            except OSError as exc:
                log.warning("freezing %s failed (%s); killing by signals", self.name, exc)
        if self._kill_rounds():
            return True
        log.info("%s not empty yet after kill_all (budget spent); call again", self.name)
        return False

    def _kill_frozen(self) -> bool:
        d = self._dirs["freezer"]
        if d.version == 1:
            state, freeze, thaw = d.path + "/freezer.state", b"FROZEN", b"THAWED"
        else:
            state, freeze, thaw = d.path + "/cgroup.freeze", b"1", b"0"
        _write(state, freeze)
        try:
            settled = self._wait_frozen(d)
            for pid in _tasks(d.path):
                _sigkill(pid)
        finally:
            _write(state, thaw)
        return settled

    @staticmethod
    def _wait_frozen(d: _Dir) -> bool:
        """Spin until the freeze has settled (no task still running, e.g. inside fork())."""
        deadline = time.monotonic() + _SETTLE_BUDGET_S
        while True:
            if d.version == 1:
                if _read(d.path + "/freezer.state").strip() == b"FROZEN":
                    return True
            elif _keyed(_read(d.path + "/cgroup.events"), b"frozen") == 1:
                return True
            if time.monotonic() > deadline:
                return False
            os.sched_yield()

    def _kill_rounds(self) -> bool:
        if self._list_dir is None:
            return True
        deadline = time.monotonic() + _ROUNDS_BUDGET_S
        killed: set[int] = set()
        while True:
            try:
                pids = _tasks(self._list_dir)
            except FileNotFoundError:
                return True
            if not pids:
                return True
            for pid in pids:
                if pid not in killed:
                    _sigkill(pid)
                    killed.add(pid)
            if time.monotonic() > deadline:
                return False
            os.sched_yield()

    # -- accounting -----------------------------------------------------------------------

    def oom_kills(self) -> int:
        """How many processes the OOM killer has killed in this group so far, since it was
        created or :meth:`recycle`-d (0 if unknown).

        Classify an invocation by the delta across it: each OOM kill adds exactly one."""
        mem = self._dirs.get("memory")
        if mem is None:
            return 0
        return max(0, self._raw_oom_kills() - self._oom_base)

    def _raw_oom_kills(self) -> int:
        mem = self._dirs.get("memory")
        if mem is None:
            return 0
        name = "/memory.oom_control" if mem.version == 1 else "/memory.events"
        try:
            return _keyed(_read(mem.path + name), b"oom_kill") or 0
        except (OSError, ValueError):
            return 0

    def peak_memory_bytes(self) -> int | None:
        """Highest memory usage since creation or :meth:`reset_peak`; None if unknown."""
        mem = self._dirs.get("memory")
        if mem is None:
            return None
        try:
            if mem.version == 1:
                return int(_read(mem.path + "/memory.max_usage_in_bytes"))
            if self._peak_fd is not None:  # a v2 reset only shows through the same fd
                return int(os.pread(self._peak_fd, 64, 0))
            return int(_read(mem.path + "/memory.peak"))
        except (OSError, ValueError):
            return None

    def memory_bytes(self) -> int | None:
        """Current memory usage (including page cache and tmpfs charged here); None if unknown."""
        mem = self._dirs.get("memory")
        if mem is None:
            return None
        name = "/memory.usage_in_bytes" if mem.version == 1 else "/memory.current"
        try:
            return int(_read(mem.path + name))
        except (OSError, ValueError):
            return None

    def cpu_time_s(self) -> float | None:
        """CPU time (user + system) used by the group since it was created or
        :meth:`recycle`-d, in seconds; None if unknown."""
        raw = self._raw_cpu_time_s()
        return None if raw is None else max(0.0, raw - self._cpu_base)

    def _raw_cpu_time_s(self) -> float | None:
        cpu = self._dirs.get("cpu")
        if cpu is None:
            return None
        try:
            if cpu.version == 1:
                return int(_read(cpu.path + "/cpuacct.usage")) / 1e9
            usec = _keyed(_read(cpu.path + "/cpu.stat"), b"usage_usec")
        except (OSError, ValueError):
            return None
        return None if usec is None else usec / 1e6

    def reset_peak(self) -> None:
        """Restart peak tracking at the current usage (for a reused worker).

        v1: write to memory.max_usage_in_bytes. v2: write to memory.peak (Linux 6.12+; the
        reset is per open file, so the file stays open until :meth:`remove`); else a no-op.
        """
        mem = self._dirs.get("memory")
        if mem is None:
            return
        if mem.version == 1:
            with contextlib.suppress(FileNotFoundError):
                _write(mem.path + "/memory.max_usage_in_bytes", b"0")
            return
        if not self._peak_resettable:
            return
        fd = self._peak_fd
        try:
            if fd is None:
                fd = os.open(mem.path + "/memory.peak", os.O_RDWR | os.O_CLOEXEC)
            os.pwrite(fd, b"reset\n", 0)
        except OSError as exc:
            log.debug("memory.peak of %s cannot be reset: %s", self.name, exc)
            self._peak_resettable = False
            if fd is not None:
                os.close(fd)
            self._peak_fd = None
            return
        self._peak_fd = fd

    # -- reuse ----------------------------------------------------------------------------

    def has_tasks(self) -> bool:
        """Any task still counted here: v1 ``pids.current`` counts a zombie until it is reaped
        (an rmdir succeeds before that), else live processes (v2 ``populated``, a listing)."""
        pids = self._dirs.get("pids")
        try:
            if pids is not None and pids.version == 1:
                return int(_read(pids.path + "/pids.current")) != 0
        except FileNotFoundError:
            return False
        return not self.is_empty()

    def recycle(self, *, max_charge_bytes: int = _RECYCLE_MAX_CHARGE) -> bool:
        """Make the group ready for another worker, if it can be: True when it can.

        Only a group with no task at all (v1 ``pids.current`` 0, which counts zombies too; else
        an empty listing, or v2 ``populated`` 0), no sub-group, and at most
        ``max_charge_bytes`` of memory still charged (page cache a worker left would count
        against the next one's limit) qualifies. Then the peak is reset (v1; v2 where the
        kernel can, else it does not qualify), v1 CPU accounting restarts at 0, and the
        counters the kernel cannot reset (OOM kills, v2 CPU) get a new baseline. Limits stay as
        they are: the next :meth:`set_limits` writes only what differs. A group that does not
        qualify should be removed (:meth:`remove`).
        """
        if self._removed:
            return False
        try:
            if self.has_tasks():
                return False
            if any(_subdirs(path) for path in self._paths):
                return False
            usage = self.memory_bytes()
            if usage is not None and usage > max_charge_bytes:
                return False
            mem = self._dirs.get("memory")
            if mem is not None:
                if mem.version == 2 and not self._peak_resettable:
                    return False
                self.reset_peak()
                if mem.version == 2 and not self._peak_resettable:
                    return False
            cpu = self._dirs.get("cpu")
            if cpu is not None and cpu.version == 1:
                _write(cpu.path + "/cpuacct.usage", b"0")
                self._cpu_base = 0.0
            else:
                self._cpu_base = self._raw_cpu_time_s() or 0.0
            self._oom_base = self._raw_oom_kills()
        except (OSError, ValueError) as exc:
            log.debug("cgroup %s cannot be recycled: %s", self.name, exc)
            return False
        self.recycled += 1
        return True

    # -- removal --------------------------------------------------------------------------

    def remove(self) -> bool:
        """rmdir the group (and any sub-group) in every hierarchy.

        Returns False, raising nothing, if some part is still busy (a process has not exited
        yet); call again later. True once everything is gone."""
        done = True
        for path in self._paths:
            if path in self._removed:
                continue
            try:
                _rmtree(path)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    log.warning("cannot remove cgroup %s: %s", path, exc)
                done = False
                continue
            self._removed.add(path)
        if done:
            self._release()
            log.debug("removed cgroup %s", self.name)
        return done

    def _release(self) -> None:
        if self._peak_fd is not None:
            os.close(self._peak_fd)
            self._peak_fd = None

    def _destroy(self, deadline: float) -> bool:
        """Kill everything in the tree by every means available, wait (until ``deadline``)
        for those processes to exit, remove the tree. For stale and closing groups."""
        try:
            self.kill_all()  # incomplete is fine: every task is killed again below
        except OSError as exc:
            log.warning("kill_all of %s failed: %s", self.name, exc)
        freezer = self._dirs.get("freezer")
        if freezer is not None and freezer.version == 1:
            _thaw_tree(freezer.path)  # a task frozen by a crashed supervisor cannot die
        while True:
            left: list[int] = []
            for path in self._paths:
                try:
                    pids = _tasks(path)
                except OSError:
                    continue
                for pid in pids:
                    _sigkill(pid)
                left.extend(pids)
            if left and not _wait_exit(left, deadline):
                log.warning("processes of %s did not exit in time: %s", self.name, left)
            if self.remove():
                return True
            if not left or time.monotonic() >= deadline:
                return False


def _thaw_tree(path: str) -> None:
    try:
        for sub in _subdirs(path):
            _thaw_tree(sub)
        _write(path + "/freezer.state", b"THAWED")
    except OSError:
        pass


class CgroupManager:
    """Owns one parent group per hierarchy, ``<own cgroup>/<prefix>-<pid>-<hex>``, and the
    worker groups below it.

    Never raises because cgroups are missing: :attr:`available` is False (or a controller is
    off in :attr:`report`) and ``report.reason`` says why.

    Args:
        prefix: first part of the group names; :meth:`sweep_stale` matches on it.
        kill_method: "auto" (strongest available), or the strongest method to use:
            "cgroup.kill", "freezer", "signals".
        move_self: v2 only: allow moving our own process into ``<own>/supervisor`` so
            controllers can be enabled below our cgroup (the no-internal-process rule).
    """

    def __init__(
        self,
        prefix: str = "sandbox",
        *,
        kill_method: KillMethod = "auto",
        move_self: bool = True,
        _layout: _Layout | None = None,
    ) -> None:
        _check_name(prefix, "prefix")
        self.prefix = prefix
        self.name = f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        self._closed = False
        self._workers: weakref.WeakSet[WorkerCgroup] = weakref.WeakSet()
        self._layout = layout = _layout if _layout is not None else _probe()
        plan = _plan(layout, kill_method)
        problems = list(plan.problems)
        roles = dict(plan.roles)
        # Hierarchy (by own dir) -> our parent group's directory in it.
        self._parents: dict[str, str] = {}
        self._bases: dict[str, str] = {}  # hierarchy own dir -> the dir our group lives in
        for h in {h.own: h for h in roles.values()}.values():
            users = [r for r, rh in roles.items() if rh.own == h.own]
            base, enable = h.own, ""
            if h.version == 2:
                wanted: set[str] = {r for r in ("memory", "pids") if r in users}
                base, enabled = self._prepare_v2(h, wanted, move_self, problems)
                for role in wanted - enabled:
                    del roles[role]
                enable = " ".join(f"+{c}" for c in sorted(enabled))
            path = os.path.join(base, self.name)
            try:
                os.mkdir(path, 0o755)
                if enable:
                    _write(path + "/cgroup.subtree_control", enable.encode())
                if "memory" in users and h.version == 1:
                    _enable_oom_killer(path)
            except OSError as exc:
                problems.append(f"cannot create {path}: {exc.strerror or exc}")
                for role in users:
                    roles.pop(role, None)
                with contextlib.suppress(OSError):
                    os.rmdir(path)
                continue
            self._parents[h.own] = path
            self._bases[h.own] = base
        method = plan.kill_method
        if method == "cgroup.kill" and "unified" not in roles:
            method = "freezer" if "freezer" in roles else "signals"
        elif method == "freezer" and "freezer" not in roles:
            method = "signals"
        self._roles = {r: _Dir(self._parents[h.own], h.version) for r, h in roles.items()}
        self._kill_method = method if self._roles else ""
        self.available = bool(self._roles)
        if not self.available and not problems:
            problems.append("no cgroup hierarchy is usable")
        self.report = _make_report(
            (d.version for d in self._roles.values()), self._roles, self._kill_method, problems
        )
        self._group = WorkerCgroup(self.name, self._roles, self._kill_method)
        if self.available:
            log.info("cgroups: %s under %s", self.report, ", ".join(self._group.paths))
        else:
            log.warning("cgroups unavailable: %s", self.report.reason)

    def __repr__(self) -> str:
        return f"CgroupManager({self.name!r}, available={self.available}, closed={self._closed})"

    @property
    def role_paths(self) -> dict[str, str]:
        """Where each role in use (``memory``, ``pids``, ``cpu``, ...) has our parent group."""
        return {role: d.path for role, d in self._roles.items()}

    def __enter__(self) -> CgroupManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def paths(self) -> tuple[str, ...]:
        """Our parent group's directory in each hierarchy."""
        return self._group.paths

    @staticmethod
    def _prepare_v2(
        h: _Hierarchy, wanted: set[str], move_self: bool, problems: list[str]
    ) -> tuple[str, set[str]]:
        """Make ``wanted`` controllers available to our children; returns (base dir, enabled)."""
        base = h.own
        if os.path.basename(base) == SUPERVISOR_LEAF and os.path.dirname(base).startswith(h.mount):
            base = os.path.dirname(base)  # an earlier manager moved us into the leaf
        if not wanted:
            return base, set()
        try:
            available = set(_read(base + "/cgroup.controllers").decode().split())
            enabled = set(_read(base + "/cgroup.subtree_control").decode().split())
        except OSError as exc:
            problems.append(f"cannot read {base}: {exc.strerror or exc}")
            return base, set()
        for ctl in sorted(wanted - available):
            problems.append(f"{ctl}: not delegated to {base} (not in its cgroup.controllers)")
        need = (wanted & available) - enabled
        if not need:
            return base, wanted & available
        request = " ".join(f"+{c}" for c in sorted(need)).encode()
        try:
            _write(base + "/cgroup.subtree_control", request)
        except OSError as exc:
            if exc.errno != errno.EBUSY or not move_self:
                problems.append(f"cannot enable {sorted(need)} in {base}: {exc.strerror or exc}")
                return base, enabled & wanted
            leaf = os.path.join(base, SUPERVISOR_LEAF)
            try:
                os.makedirs(leaf, exist_ok=True)
                _write(leaf + "/cgroup.procs", b"%d" % os.getpid())
                log.info("moved our process into %s (v2 no-internal-process rule)", leaf)
                _write(base + "/cgroup.subtree_control", request)
            except OSError as exc2:
                problems.append(
                    f"cannot enable {sorted(need)} in {base}: {exc2.strerror or exc2} "
                    "(other processes share our cgroup: v2 no-internal-process rule)"
                )
                return base, enabled & wanted
        return base, wanted & available

    def create(self, name: str) -> WorkerCgroup:
        """Create the worker group ``name`` in every hierarchy in use.

        Raises:
            ValueError: bad name. IsolationUnavailable: no cgroups (see :attr:`report`).
            RuntimeError: the manager is closed.
            OSError: the kernel refused (FileExistsError if the name is taken).
        """
        _check_name(name, "name")
        if self._closed:
            raise RuntimeError("CgroupManager is closed")
        if not self.available:
            raise IsolationUnavailable(f"no cgroups: {self.report.reason}")
        created: list[str] = []
        try:
            for parent in self._group.paths:
                path = os.path.join(parent, name)
                os.mkdir(path, 0o755)
                created.append(path)
            mem = self._roles.get("memory")
            if mem is not None and mem.version == 1:
                _enable_oom_killer(os.path.join(mem.path, name))
        except OSError:
            for path in reversed(created):
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            raise
        dirs = {r: _Dir(os.path.join(d.path, name), d.version) for r, d in self._roles.items()}
        worker = WorkerCgroup(name, dirs, self._kill_method)
        self._workers.add(worker)
        log.debug("created cgroup %s", name)
        return worker

    def sweep_stale(self, *, timeout_s: float = 1.0) -> int:
        """Kill and remove the groups ``<prefix>-<pid>-*`` whose ``<pid>`` is dead.

        Looks among our siblings and at the top level of every hierarchy. SIGKILLs every task
        in them (and below), waits up to ``timeout_s`` for those to exit, removes the trees
        bottom-up. Returns how many groups (names) were removed completely.

        Liveness is checked in our pid namespace: supervisors in other pid namespaces that
        share a hierarchy with us must use other prefixes."""
        pattern = re.compile(re.escape(self.prefix) + r"-(\d+)-[0-9a-f]+")
        # name -> groups of that name, each a role -> directory map (one name may, in theory,
        # exist both among our siblings and at the top level of a hierarchy: two groups).
        stale: dict[str, list[dict[str, _Dir]]] = {}
        hierarchies = [h for h in (*self._layout.v1.values(), self._layout.v2) if h is not None]
        for h in hierarchies:
            if h.problem:
                continue
            roles = _roles_of(h)
            if not roles:
                continue
            for top in dict.fromkeys((self._bases.get(h.own, h.own), h.own, h.mount)):
                try:
                    entries = _subdirs(top)
                except OSError:
                    continue
                for path in entries:
                    name = os.path.basename(path)
                    match = pattern.fullmatch(name)
                    if match is None or name == self.name or _pid_alive(int(match[1])):
                        continue
                    groups = stale.setdefault(name, [])
                    dirs = next((g for g in groups if roles[0] not in g), None)
                    if dirs is None:
                        dirs = {}
                        groups.append(dirs)
                    for role in roles:
                        dirs.setdefault(role, _Dir(path, h.version))
        deadline = time.monotonic() + timeout_s
        removed = 0
        for name, groups in stale.items():
            gone = True
            for dirs in groups:
                can_kill = "unified" in dirs and os.path.exists(
                    dirs["unified"].path + "/cgroup.kill"
                )
                method = (
                    "cgroup.kill" if can_kill else "freezer" if "freezer" in dirs else "signals"
                )
                group = WorkerCgroup(name, dirs, method)
                if group._destroy(deadline):
                    log.info("removed stale cgroup %s", ", ".join(group.paths))
                else:
                    log.warning("stale cgroup %s is still busy", ", ".join(group.paths))
                    gone = False
            removed += gone
        return removed

    def close(self, *, timeout_s: float = 1.0) -> None:
        """Kill every process below our groups, wait up to ``timeout_s`` for them to exit,
        remove every group. Idempotent; a second call retries what was still busy."""
        first = not self._closed
        self._closed = True
        for worker in list(self._workers):
            worker._release()
        if not self.available or (not first and all(p in self._group._removed for p in self.paths)):
            return
        if self._group._destroy(time.monotonic() + timeout_s):
            log.debug("closed cgroups %s", self.name)
        else:
            log.warning(
                "cgroups of %s still busy after close; sweep_stale will find them", self.name
            )


def delegation_hint() -> str:
    """What an administrator can do so that an ordinary user gets cgroups (for ``doctor``)."""
    return ("to give this user cgroups, delegate a subtree to it: run the program in a systemd "
            "unit or scope with Delegate=yes (e.g. `systemd-run --user --scope -p Delegate=yes "
            "PROGRAM`, or `Delegate=memory pids cpu` in its [Service] section; a login session's "
            "user@UID.service is delegated already), or in a container with a cgroup namespace "
            "of its own; on cgroup v1, root makes a group per controller, chowns it (and its "
            "files) to the user and starts the program in it")


def _roles_of(h: _Hierarchy) -> list[str]:
    if h.version == 2:
        return ["unified", *(["freezer"] if h.can_freeze else []), "memory", "pids", "cpu"]
    return [r for r, ctl in _V1_CONTROLLER.items() if ctl in h.controllers]


def _enable_oom_killer(path: str) -> None:
    """v1: a group inherits oom_kill_disable from its parent; we need the OOM killer on."""
    control = path + "/memory.oom_control"
    if _keyed(_read(control), b"oom_kill_disable") == 1:
        _write(control, b"0")
