"""sandbox.cgroups against the real kernel: real cgroups, real forked processes.

Tests skip (with the reason from :func:`sandbox.cgroups.detect` or the manager's report) when
this machine lacks a controller. Nothing sleeps to synchronise: children report over pipes,
deaths are awaited on pidfds or SIGCHLD, each wait bounded by a deadlock guard. The test
process is a child subreaper during each test, so every orphan (double-forked grandchildren,
fork-bomb processes) is reaped here, and every test checks that no process and no cgroup
named with its prefix is left.

On a hybrid machine (v1 controllers plus a cgroup2 mount) the kill, membership and CPU tests
also run on a "v2-only" view that ignores the v1 hierarchies, so cgroup.kill, cgroup.freeze,
cgroup.events and cpu.stat are exercised on a real cgroup2 hierarchy.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox import cgroups
from sandbox.cgroups import CgroupManager, CgroupReport, WorkerCgroup, detect
from sandbox.errors import IsolationUnavailable

#: Deadlock guard for every wait (never a synchronisation delay).
GUARD_S = 10.0
MiB = 1 << 20

REPORT = detect()
LAYOUT = cgroups._probe()
_V2_ONLY = (
    cgroups._Layout({}, LAYOUT.v2)
    if LAYOUT.v1 and LAYOUT.v2 is not None and not LAYOUT.v2.problem
    else None
)
VIEWS = ["host", *(["v2-only"] if _V2_ONLY is not None else [])]

pytestmark = pytest.mark.skipif(
    REPORT.version is None, reason=f"no usable cgroups here: {REPORT.reason}"
)

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper(on: bool) -> None:
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _children() -> set[int]:
    found: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            found.update(int(p) for p in f.read().split())
    return found


# ---------------------------------------------------------------------------------------------
# Process helpers


class Reaper:
    """Reaps our children (and orphans, as we are a subreaper) with bounded waits on SIGCHLD."""

    def __init__(self) -> None:
        self.status: dict[int, int] = {}

    def _reap_ready(self) -> bool:
        """Reap every exited child; False once we have no children at all."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            self.status[pid] = status

    def wait(self, pid: int, timeout: float = GUARD_S) -> int:
        """The wait status of child ``pid`` (reaping it)."""
        deadline = time.monotonic() + timeout
        while pid not in self.status:
            self._reap_ready()
            if pid in self.status:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"deadlock guard: child {pid} did not exit in {timeout} s")
            signal.sigtimedwait({signal.SIGCHLD}, remaining)
        return self.status[pid]

    def reap_all(self, timeout: float = GUARD_S) -> set[int]:
        """Wait until we have no child left; returns the live ones still there at the guard."""
        deadline = time.monotonic() + timeout
        while self._reap_ready():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _children()
            signal.sigtimedwait({signal.SIGCHLD}, remaining)
        return set()


def fork(body: Callable[[], object]) -> int:
    """Fork a child that runs ``body`` and exits (0, or 70 with a traceback on stderr)."""
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            body()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def recv(fd: int, n: int, timeout: float = GUARD_S) -> bytes:
    """Read exactly ``n`` bytes (less only at EOF), bounded by a deadlock guard."""
    deadline = time.monotonic() + timeout
    data = b""
    while len(data) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            pytest.fail(f"deadlock guard: got {len(data)} of {n} bytes in {timeout} s")
        chunk = os.read(fd, n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def recv_some(fd: int, n: int = 4096, timeout: float = GUARD_S) -> bytes:
    """One read of whatever arrives first (b"" at EOF), bounded by a deadlock guard."""
    if not select.select([fd], [], [], timeout)[0]:
        pytest.fail(f"deadlock guard: nothing to read in {timeout} s")
    return os.read(fd, n)


def wait_exit(pid: int, timeout: float = GUARD_S) -> None:
    """Wait on a pidfd until ``pid`` has exited (whoever its parent is)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not select.select([fd], [], [], timeout)[0]:
            pytest.fail(f"deadlock guard: {pid} still alive after {timeout} s")
    finally:
        os.close(fd)


def kill_all(worker: WorkerCgroup, timeout: float = GUARD_S) -> None:
    """kill_all, again while it reports that its time budget ran out (bounded)."""
    deadline = time.monotonic() + timeout
    while not worker.kill_all():
        if time.monotonic() > deadline:
            pytest.fail(f"deadlock guard: kill_all incomplete after {timeout} s")


def killed_by(status: int, sig: int = signal.SIGKILL) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == sig


class Member:
    """A child that joins a worker group, reports, then holds until released or killed."""

    def __init__(
        self, group: WorkerCgroup | list[str], then: Callable[[int], object] | None = None
    ) -> None:
        procs = group.procs_files() if isinstance(group, WorkerCgroup) else group
        self.report_r, report_w = os.pipe()
        hold_r, self.hold_w = os.pipe()

        def body() -> None:
            os.close(self.report_r)
            os.close(self.hold_w)
            cgroups.join(procs)
            os.write(report_w, b"j")
            if then is not None:
                then(report_w)
            os.read(hold_r, 1)  # until released (EOF) or killed

        self.pid = fork(body)
        os.close(report_w)
        os.close(hold_r)
        assert recv(self.report_r, 1) == b"j", "child failed to join its cgroups"

    def release(self) -> None:
        if self.hold_w >= 0:
            os.close(self.hold_w)
            self.hold_w = -1

    def close(self) -> None:
        self.release()
        if self.report_r >= 0:
            os.close(self.report_r)
            self.report_r = -1


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(autouse=True)
def reaper() -> Iterator[Reaper]:
    """Block SIGCHLD (to wait on it) and adopt orphans; afterwards, no child may be left."""
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    _set_subreaper(True)
    r = Reaper()
    try:
        yield r
    finally:
        try:
            left = r.reap_all()
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            if left:
                r.reap_all()
        finally:
            _set_subreaper(False)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        assert not left, f"processes left behind: {sorted(left)}"


def _groups_named(prefix: str) -> list[str]:
    found = []
    for h in (*LAYOUT.v1.values(), LAYOUT.v2):
        if h is None or h.problem:
            continue
        for top in {h.own, h.mount}:
            found += [str(p) for p in Path(top).iterdir() if p.name.startswith(prefix)]
    return sorted(set(found))


def _force_remove(path: str) -> None:
    for sub in [p for p in Path(path).iterdir() if p.is_dir()]:
        _force_remove(str(sub))
    if os.path.exists(path + "/freezer.state"):
        Path(path, "freezer.state").write_text("THAWED")  # a frozen task cannot die
    for pid in Path(path, "cgroup.procs").read_text().split():
        os.kill(int(pid), signal.SIGKILL)
        wait_exit(int(pid))
    os.rmdir(path)


@pytest.fixture
def prefix() -> Iterator[str]:
    """A prefix of our own (so concurrent sweeps by others never match ours); afterwards no
    cgroup may carry it."""
    name = f"sbt{secrets.token_hex(4)}"
    yield name
    left = _groups_named(name)
    for path in left:
        _force_remove(path)
    assert not left, f"cgroups left behind: {left}"


@pytest.fixture
def make_manager(prefix: str) -> Iterator[Callable[..., CgroupManager]]:
    managers: list[CgroupManager] = []

    def make(view: str = "host", **kwargs: object) -> CgroupManager:
        layout = _V2_ONLY if view == "v2-only" else None
        manager = CgroupManager(prefix, _layout=layout, **kwargs)  # type: ignore[arg-type]
        managers.append(manager)
        if not manager.available:
            pytest.skip(f"cgroups unavailable: {manager.report.reason}")
        return manager

    yield make
    for manager in managers:
        manager.close()


def need(manager: CgroupManager, *features: str) -> None:
    missing = [f for f in features if not getattr(manager.report, f)]
    if missing:
        pytest.skip(f"no {', '.join(missing)} cgroup here: {manager.report.reason}")


def kill_params() -> list[tuple[str, str]]:
    return [(view, method) for view in VIEWS for method in cgroups.KILL_METHODS]


def manager_for(make: Callable[..., CgroupManager], view: str, method: str) -> CgroupManager:
    manager = make(view, kill_method=method)
    if manager.report.kill_method != method:
        pytest.skip(f"kill method {method} unavailable in {view}: {manager.report.reason}")
    return manager


# ---------------------------------------------------------------------------------------------
# Detection


def test_detect_report_is_consistent() -> None:
    report = detect()
    assert report == detect()
    assert set(report.to_dict()) == {
        "version", "memory", "pids", "cpu", "freeze", "reason", "kill_method"
    }  # fmt: skip
    assert report.version in (1, 2, None)
    if report.reason == "":
        assert report.memory and report.pids and report.cpu and report.freeze
    else:
        assert not (report.memory and report.pids and report.cpu and report.freeze)


def _fake_v2(tmp_path: Path, controllers: str = "cpuset cpu io memory pids") -> Path:
    own = tmp_path / "cg" / "app"
    own.mkdir(parents=True)
    for name, text in [("cgroup.controllers", controllers), ("cgroup.subtree_control", ""),
                       ("cgroup.type", "domain"), ("cgroup.kill", ""), ("cgroup.freeze", "0"),
                       ("cgroup.procs", "1\n"), ("cpu.stat", "usage_usec 0\n")]:  # fmt: skip
        (own / name).write_text(text + "\n")
    return tmp_path / "cg"


def test_detect_pure_v2_layout(tmp_path: Path) -> None:
    mnt = _fake_v2(tmp_path)
    mountinfo = f"30 25 0:26 / {mnt} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    report = cgroups._report_of(cgroups._plan(cgroups._probe(mountinfo, "0::/app\n")))
    assert report == CgroupReport(2, True, True, True, True, "", "cgroup.kill")


def test_detect_v2_without_delegated_memory(tmp_path: Path) -> None:
    mnt = _fake_v2(tmp_path, controllers="cpu pids")
    mountinfo = f"30 25 0:26 / {mnt} rw - cgroup2 cgroup2 rw\n"
    report = cgroups._report_of(cgroups._plan(cgroups._probe(mountinfo, "0::/app\n")))
    assert (report.version, report.memory, report.pids) == (2, False, True)
    assert "memory: not delegated" in report.reason


def test_detect_read_only_and_missing(tmp_path: Path) -> None:
    mnt = _fake_v2(tmp_path)
    read_only = f"30 25 0:26 / {mnt} ro,nosuid - cgroup2 cgroup2 ro\n"
    report = cgroups._report_of(cgroups._plan(cgroups._probe(read_only, "0::/app\n")))
    assert report.version is None and not report.memory
    assert "read-only" in report.reason
    report = cgroups._report_of(cgroups._plan(cgroups._probe("", "0::/\n")))
    assert report.version is None and "no cgroup filesystem" in report.reason


def test_detect_v1_nested_mount_root_and_comounted(tmp_path: Path) -> None:
    # memory mounted with its root at /outer (as inside some containers), cpu,cpuacct together.
    (tmp_path / "memory" / "inner").mkdir(parents=True)
    (tmp_path / "cpu,cpuacct").mkdir()
    mountinfo = (
        f"40 31 0:33 /outer {tmp_path}/memory rw - cgroup cgroup rw,memory\n"
        f"41 31 0:34 / {tmp_path}/cpu\\054cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
    )
    layout = cgroups._probe(mountinfo, "5:memory:/outer/inner\n3:cpu,cpuacct:/\n")
    assert layout.v1["memory"].own == f"{tmp_path}/memory/inner"
    assert layout.v1["cpuacct"].own == f"{tmp_path}/cpu,cpuacct"
    report = cgroups._report_of(cgroups._plan(layout))
    assert (report.version, report.memory, report.pids, report.cpu) == (1, True, False, True)
    assert "pids: controller not mounted" in report.reason


def test_manager_without_cgroups_reports_and_refuses(prefix: str) -> None:
    manager = CgroupManager(prefix, _layout=cgroups._Layout({}, None, ("no cgroups here",)))
    assert not manager.available and manager.report.version is None
    assert "no cgroups here" in manager.report.reason
    with pytest.raises(IsolationUnavailable):
        manager.create("w")
    assert manager.sweep_stale() == 0
    manager.close()
    manager.close()


# ---------------------------------------------------------------------------------------------
# Groups and membership


@pytest.mark.parametrize("view", VIEWS)
def test_create_and_remove(make_manager: Callable[..., CgroupManager], view: str) -> None:
    manager = make_manager(view)
    assert all(os.path.isdir(p) for p in manager.paths)
    name = f"{manager.prefix}-{os.getpid()}-"
    assert all(os.path.basename(p).startswith(name) for p in manager.paths)
    worker = manager.create("w0")
    assert [os.path.dirname(p) for p in worker.paths] == list(manager.paths)
    assert all(os.path.isfile(f) for f in worker.procs_files())
    with pytest.raises(FileExistsError):
        manager.create("w0")
    for bad in ("", "..", "a/b"):
        with pytest.raises(ValueError):
            manager.create(bad)
    assert worker.is_empty() and worker.pids() == []
    assert worker.remove() is True
    assert not any(os.path.exists(p) for p in worker.paths)
    assert worker.remove() is True
    worker.kill_all()  # on a removed group: nothing to do, nothing raised
    assert worker.pids() == [] and worker.is_empty() and worker.oom_kills() == 0


@pytest.mark.parametrize("view", VIEWS)
def test_child_joins_by_writing_zero(
    make_manager: Callable[..., CgroupManager], reaper: Reaper, view: str
) -> None:
    worker = make_manager(view).create("w")
    member = Member(worker)
    try:
        assert worker.pids() == [member.pid]
        assert not worker.is_empty()
        with open(f"/proc/{member.pid}/cgroup") as f:
            membership = f.read()
        for path in worker.paths:
            assert any(path.endswith(line.split(":", 2)[2]) for line in membership.splitlines())
        assert worker.remove() is False  # busy, and nothing raised
    finally:
        member.close()
    assert reaper.wait(member.pid) == 0
    assert worker.is_empty() and worker.pids() == []
    assert worker.remove() is True


@pytest.mark.parametrize("view", VIEWS)
def test_zombie_is_not_listed_and_does_not_block_remove(
    make_manager: Callable[..., CgroupManager], reaper: Reaper, view: str
) -> None:
    worker = make_manager(view).create("w")
    member = Member(worker)
    member.release()  # it exits; we do not reap it yet
    wait_exit(member.pid)
    try:
        assert worker.pids() == [] and worker.is_empty()
        pids_dirs = [p for p in worker.paths if os.path.exists(p + "/pids.current")]
        for path in pids_dirs:  # ...but a zombie still holds its pids slot
            assert Path(path, "pids.current").read_text().strip() == "1"
        assert worker.remove() is True
    finally:
        member.close()
        assert reaper.wait(member.pid) == 0


# ---------------------------------------------------------------------------------------------
# Limits


def test_memory_limit_oom_kills_and_counts(
    make_manager: Callable[..., CgroupManager], reaper: Reaper
) -> None:
    manager = make_manager()
    need(manager, "memory")
    worker = manager.create("w")
    worker.set_limits(memory_bytes=48 * MiB, max_pids=None)
    before = worker.oom_kills()

    def allocate(report_w: int) -> None:
        hoard = [b"x" * (8 * MiB) for _ in range(64)]  # 512 MiB, touched
        os.write(report_w, b"survived %d" % len(hoard))

    member = Member(worker, then=allocate)
    try:
        status = reaper.wait(member.pid)
        assert recv(member.report_r, 64) == b""  # no "survived"
    finally:
        member.close()
    assert killed_by(status), f"expected SIGKILL, got wait status {status:#x}"
    assert worker.oom_kills() - before == 1
    peak = worker.peak_memory_bytes()
    assert peak is not None and 40 * MiB <= peak <= 48 * MiB
    assert worker.remove() is True


def test_pids_limit_makes_fork_fail_with_eagain(
    make_manager: Callable[..., CgroupManager], reaper: Reaper
) -> None:
    manager = make_manager()
    need(manager, "pids")
    worker = manager.create("w")
    worker.set_limits(memory_bytes=None, max_pids=4)

    def fork_until_refused(report_w: int) -> None:
        hold_r, _hold_w = os.pipe()
        forked = 0
        while True:
            try:
                pid = os.fork()
            except OSError as exc:
                os.write(report_w, b"%d %d" % (forked, exc.errno or 0))
                return
            if pid == 0:
                os.read(hold_r, 1)  # held until killed
                os._exit(0)
            forked += 1
            if forked > 64:
                os.write(report_w, b"%d 0" % forked)
                return

    member = Member(worker, then=fork_until_refused)
    try:
        forked, err = map(int, recv_some(member.report_r).split())
        assert (forked, err) == (3, errno.EAGAIN)
        assert len(worker.pids()) == 4
        kill_all(worker)
    finally:
        member.close()
    assert not reaper.reap_all()
    assert killed_by(reaper.status[member.pid])
    assert worker.is_empty()
    assert worker.remove() is True


def test_set_limits_orders_writes_and_skips_unchanged(
    make_manager: Callable[..., CgroupManager], monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = make_manager()
    need(manager, "memory", "pids")
    worker = manager.create("w")
    writes: list[str] = []
    real_write = cgroups._write

    def counting_write(path: str, data: bytes) -> None:
        writes.append(os.path.basename(path))
        real_write(path, data)

    monkeypatch.setattr(cgroups, "_write", counting_write)
    worker.set_limits(memory_bytes=None, max_pids=None)
    assert writes == []  # a fresh group is unlimited already
    v1 = any(os.path.exists(p + "/memory.limit_in_bytes") for p in worker.paths)
    for memory, expected_first in ((64 * MiB, "lower"), (128 * MiB, "raise"), (32 * MiB, "lower"),
                                   (None, "raise")):  # fmt: skip
        writes.clear()
        worker.set_limits(memory_bytes=memory, max_pids=8)
        files = [w for w in writes if w != "pids.max"]
        if v1 and "memory.memsw.limit_in_bytes" in files:
            # memsw must stay >= memory: written first when raising, last when lowering.
            assert files[0] == (
                "memory.memsw.limit_in_bytes" if expected_first == "raise"
                else "memory.limit_in_bytes"
            )  # fmt: skip
        writes.clear()
        worker.set_limits(memory_bytes=memory, max_pids=8)
        assert writes == [], "unchanged limits must not be written again"
    monkeypatch.undo()
    pids_dir = next(p for p in worker.paths if os.path.exists(p + "/pids.max"))
    assert Path(pids_dir, "pids.max").read_text().strip() == "8"
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError):
            worker.set_limits(memory_bytes=bad, max_pids=None)  # type: ignore[arg-type]


def test_peak_memory_and_reset(make_manager: Callable[..., CgroupManager], reaper: Reaper) -> None:
    manager = make_manager()
    need(manager, "memory")
    worker = manager.create("w")

    def allocate_then_free(report_w: int) -> None:
        hoard = b"x" * (32 * MiB)
        os.write(report_w, b"a")
        os.read(go_r, 1)
        del hoard
        os.write(report_w, b"f")

    go_r, go_w = os.pipe()
    member = Member(worker, then=allocate_then_free)
    try:
        assert recv(member.report_r, 1) == b"a"
        usage, peak = worker.memory_bytes(), worker.peak_memory_bytes()
        assert usage is not None and usage >= 32 * MiB
        assert peak is not None and peak >= usage
        os.write(go_w, b"g")
        assert recv(member.report_r, 1) == b"f"
        worker.reset_peak()
        after = worker.peak_memory_bytes()
        assert after is not None and after < 16 * MiB
    finally:
        member.close()
        os.close(go_r)
        os.close(go_w)
    assert reaper.wait(member.pid) == 0
    assert worker.remove() is True


@pytest.mark.parametrize("view", VIEWS)
def test_cpu_time_grows(
    make_manager: Callable[..., CgroupManager], reaper: Reaper, view: str
) -> None:
    manager = make_manager(view)
    need(manager, "cpu")
    worker = manager.create("w")

    def burn(report_w: int) -> None:
        start = time.process_time()
        while time.process_time() - start < 0.15:
            pass
        os.write(report_w, b"d")

    member = Member(worker, then=burn)
    try:
        assert recv(member.report_r, 1) == b"d"
        used = worker.cpu_time_s()
    finally:
        member.close()
    assert used is not None and used >= 0.14
    assert reaper.wait(member.pid) == 0
    assert worker.remove() is True


# ---------------------------------------------------------------------------------------------
# Killing


@pytest.mark.parametrize(("view", "method"), kill_params())
def test_kill_all_reaches_setsid_double_forked_grandchild(
    make_manager: Callable[..., CgroupManager], reaper: Reaper, view: str, method: str
) -> None:
    worker = manager_for(make_manager, view, method).create("w")

    def daemonize(report_w: int) -> None:
        pid_r, pid_w = os.pipe()
        middle = os.fork()
        if middle == 0:
            os.setsid()
            if os.fork() == 0:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_IGN)
                os.write(pid_w, b"%08d" % os.getpid())
                os.read(hold_fd(), 1)
            os._exit(0)
        os.waitpid(middle, 0)  # the middle is gone: the daemon is an orphan now
        os.write(report_w, os.read(pid_r, 8) + b"m")

    member = Member(worker, then=daemonize)
    try:
        daemon = int(recv(member.report_r, 8))
        assert recv(member.report_r, 1) == b"m"
        assert os.getsid(daemon) != os.getsid(member.pid)
        assert os.getppid() != daemon and sorted(worker.pids()) == sorted([member.pid, daemon])
        kill_all(worker)
    finally:
        member.close()
    wait_exit(daemon)
    assert not reaper.reap_all()
    assert killed_by(reaper.status[member.pid]) and killed_by(reaper.status[daemon])
    assert worker.is_empty()
    assert worker.remove() is True


def hold_fd() -> int:
    """A fresh pipe's read end that never gets data: blocks a process until it is killed."""
    r, _w = os.pipe()
    return r


@pytest.mark.parametrize(("view", "method"), kill_params())
def test_kill_all_stops_a_fork_bomb(
    make_manager: Callable[..., CgroupManager], reaper: Reaper, view: str, method: str
) -> None:
    manager = manager_for(make_manager, view, method)
    need(manager, "pids")
    worker = manager.create("w")
    limit = 24
    worker.set_limits(memory_bytes=None, max_pids=limit)

    def bomb(report_w: int) -> None:
        while True:
            try:
                if os.fork() == 0:
                    os.write(report_w, b"b")
            except OSError:
                pass

    member = Member(worker, then=bomb)
    try:
        assert recv(member.report_r, limit - 1) == b"b" * (limit - 1)  # every slot taken
        kill_all(worker)
    finally:
        member.close()
    assert not reaper.reap_all()
    assert worker.is_empty()
    assert worker.remove() is True


# ---------------------------------------------------------------------------------------------
# Sweep and close


def test_sweep_stale_kills_and_removes_groups_of_dead_supervisors(
    make_manager: Callable[..., CgroupManager], reaper: Reaper, prefix: str
) -> None:
    dead = fork(lambda: None)
    assert reaper.wait(dead) == 0  # reaped: this pid is no longer alive
    live = make_manager()  # ours: named after a live pid, must survive the sweep
    bases = [os.path.dirname(p) for p in live.paths]
    freezer = LAYOUT.v1.get("freezer")
    if freezer is not None and not freezer.problem and freezer.own not in bases:
        bases.append(freezer.own)  # a freezer group left FROZEN by a supervisor that died
    else:
        freezer = None
    sibling = [os.path.join(b, f"{prefix}-{dead}-deadbeef") for b in bases]
    tops = {h.mount for h in (*LAYOUT.v1.values(), LAYOUT.v2) if h is not None and not h.problem}
    top = [os.path.join(t, f"{prefix}-{dead}-cafe") for t in sorted(tops)]
    for path in sibling + top:
        os.mkdir(path)
    for path in sibling:
        os.mkdir(os.path.join(path, "w"))
    member = Member([os.path.join(p, "w", "cgroup.procs") for p in sibling])  # a live tenant
    try:
        if freezer is not None:
            Path(sibling[-1], "w", "freezer.state").write_text("FROZEN")
        sweeper = make_manager()
        assert sweeper.sweep_stale() == 2
    finally:
        member.close()
    assert killed_by(reaper.wait(member.pid))
    assert not any(os.path.exists(p) for p in sibling + top)
    assert all(os.path.isdir(p) for p in live.paths)


def test_close_kills_removes_and_is_idempotent(
    make_manager: Callable[..., CgroupManager], reaper: Reaper
) -> None:
    manager = make_manager()
    busy, idle = manager.create("busy"), manager.create("idle")
    member = Member(busy)
    try:
        manager.close()
    finally:
        member.close()
    assert killed_by(reaper.wait(member.pid))
    assert not any(os.path.exists(p) for p in (*manager.paths, *busy.paths, *idle.paths))
    manager.close()
    with pytest.raises(RuntimeError):
        manager.create("again")
    assert busy.remove() is True  # already gone: nothing to do


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
