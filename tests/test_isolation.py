"""Isolation layers, checked from inside the confined child and from outside it.

Each test forks a real worker (through ``fork_in_new_pid_namespace`` as the zygote would),
applies the layers, and the child reports JSON over a pipe; it then blocks on a "release"
pipe so the test can inspect ``/proc/<pid>`` from outside. Timeouts are deadlock guards only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import select
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest

from sandbox import isolation as iso
from sandbox.errors import ConfigurationError, IsolationUnavailable

GUARD_S = 20.0
ROOT = os.geteuid() == 0
LANDLOCK_ABI = iso.landlock_abi()

needs_root = pytest.mark.skipif(not ROOT, reason="per-worker uid and mounts need root here")
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux isolation layers")

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

Body = Callable[[], dict[str, Any]]


def _mountinfo() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return sorted(" ".join(line.split()[3:5]) for line in f)


def _children() -> set[int]:
    kids = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == os.getpid():
                kids.add(int(name))
    return kids


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    mounts, kids = _mountinfo(), _children()
    yield
    assert _children() == kids, "a test left a child process behind"
    assert _mountinfo() == mounts, "a test left a mount on the host"


@pytest.fixture(scope="module")
def netns_fd() -> Iterator[int]:
    fd = iso.create_empty_netns()
    yield fd
    os.close(fd)


def _read_json(fd: int, pid: int) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], GUARD_S)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError("worker did not report in time")
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        data += chunk
    assert data, "worker died without a report"
    result: dict[str, Any] = json.loads(data)
    return result


@dataclass
class Worker:
    pid: int
    report: dict[str, Any]
    allowed_fds: set[int]


def _close_fds_except(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _child(config: iso.IsolationConfig, body: Body, netns_fd: int | None,
           host_ns: dict[str, int], report_w: int, release_r: int) -> None:
    result: dict[str, Any] = {}
    try:
        _close_fds_except({report_w, release_r} | ({netns_fd} if netns_fd is not None else set()))
        ids = iso.worker_ids(config, 7)
        iso.apply_layers(config, ids, netns_fd=netns_fd, host_namespaces=host_ns,
                         allowed_fds={0, 1, 2, report_w, release_r})
        result = body()
    except BaseException:
        result["error"] = traceback.format_exc()
    finally:
        try:
            os.write(report_w, json.dumps(result).encode() + b"\n")
            os.read(release_r, 1)   # wait until the test has looked from outside
        finally:
            os._exit(0)


def run_worker(config: iso.IsolationConfig, body: Body, *, netns_fd: int | None = None,
               inspect: Callable[[Worker], None] | None = None) -> Worker:
    host_ns = iso.namespace_ids()
    report_r, report_w = os.pipe()
    release_r, release_w = os.pipe()
    pid = iso.fork_in_new_pid_namespace() if config.pid_ns else os.fork()
    if pid == 0:  # pragma: no cover - child
        _child(config, body, netns_fd, host_ns, report_w, release_r)
    os.close(report_w)
    os.close(release_r)
    try:
        worker = Worker(pid, _read_json(report_r, pid), {0, 1, 2, report_w, release_r})
        assert "error" not in worker.report, worker.report["error"]
        if inspect is not None:
            inspect(worker)
    finally:
        os.close(release_w)
        os.close(report_r)
        try:
            ready = select.select([os.pidfd_open(pid)], [], [], GUARD_S)[0]
            if not ready:
                os.kill(pid, signal.SIGKILL)
        finally:
            os.waitpid(pid, 0)
    return worker


def _errno_of(action: Callable[[], object]) -> str:
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "OK"


def _raw(name: str, *args: Any) -> str:
    nr = iso._NR[name]
    if libc.syscall(ctypes.c_long(nr), *args) == -1:
        return errno.errorcode[ctypes.get_errno()]
    return "OK"


# ----------------------------------------------------------------------------------------------

def test_config_validation() -> None:
    with pytest.raises(ConfigurationError, match="allow_network"):
        iso.IsolationConfig(allow_network=True)
    with pytest.raises(ConfigurationError, match="mode"):
        iso.IsolationConfig(mode="lenient")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="tmp_dir"):
        iso.IsolationConfig(tmp_dir="relative")
    with pytest.raises(ConfigurationError, match="slot"):
        iso.worker_ids(iso.IsolationConfig(id_count=4), 4)


def test_detect_reports_every_layer() -> None:
    report = iso.detect(iso.IsolationConfig(mode="best-effort"))
    data = report.to_dict()
    assert set(data["layers"]) == set(iso.LAYERS)
    assert data["landlock_abi"] == LANDLOCK_ABI
    json.dumps(data)
    for name, layer in report.layers.items():
        assert layer.enabled == (layer.available and report.effective.enabled(name)
                                 if name != "user_ns" else layer.enabled)


def test_detect_strict_raises_and_best_effort_downgrades(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(iso, "landlock_abi", lambda: 0)
    with pytest.raises(IsolationUnavailable, match="landlock"):
        iso.detect(iso.IsolationConfig(mode="strict"))
    report = iso.detect(iso.IsolationConfig(mode="best-effort"))
    assert not report.layers["landlock"].available
    assert not report.effective.landlock
    assert report.to_dict()["layers"]["landlock"]["enabled"] is False


def test_seccomp_program_is_well_formed() -> None:
    prog = iso.seccomp_filter(allow_network=False)
    assert prog[0] == (0x20, 0, 0, 4)              # load arch first
    assert prog[2][3] == iso.SECCOMP_RET_KILL_PROCESS
    assert prog[-1] == (0x06, 0, 0, iso.SECCOMP_RET_ALLOW)
    assert len(prog) < 4096
    for i, (code, jt, jf, _) in enumerate(prog):
        if code & 0x07 == 0x05:                    # jumps stay inside the program
            assert i + 1 + max(jt, jf) < len(prog)
    assert not any(k == iso.SECCOMP_RET_ERRNO | 0 for *_, k in prog)


def test_fork_in_new_pid_namespace_restores_parent() -> None:
    before = os.readlink("/proc/self/ns/pid_for_children")
    r, w = os.pipe()
    pid = iso.fork_in_new_pid_namespace()
    if pid == 0:  # pragma: no cover - child
        try:
            os.write(w, json.dumps({"pid": os.getpid()}).encode() + b"\n")
        finally:
            os._exit(0)
    os.close(w)
    assert _read_json(r, pid) == {"pid": 1}
    os.close(r)
    os.waitpid(pid, 0)
    assert os.readlink("/proc/self/ns/pid_for_children") == before
    assert os.readlink("/proc/self/ns/pid") == before


@needs_root
def test_sigkill_of_worker_kills_double_forked_setsid_grandchild() -> None:
    """The whole-tree kill: SIGKILL to the pid the zygote got back."""
    r, w = os.pipe()
    pid = iso.fork_in_new_pid_namespace()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                        signal.signal(sig, signal.SIG_IGN)
                    os.write(w, b"grandchild up\n")
                    while True:
                        signal.pause()
                os._exit(0)
            while True:
                signal.pause()
        finally:
            os._exit(1)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], GUARD_S)
        assert ready and os.read(r, 100) == b"grandchild up\n"
        os.kill(pid, signal.SIGKILL)
        # EOF only once every holder of ``w`` (worker, grandchild) is dead.
        ready, _, _ = select.select([r], [], [], GUARD_S)
        assert ready and os.read(r, 100) == b""
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _inside() -> dict[str, Any]:
    """Hostile attempts, run in the confined worker."""
    out: dict[str, Any] = {"uid": os.getuid(), "gid": os.getgid(), "cwd": os.getcwd(),
                           "home": os.environ.get("HOME"), "pid": os.getpid(),
                           "ppid": os.getppid(), "hostname": socket.gethostname(),
                           "shm": os.listdir("/dev/shm"),
                           "procs": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())}
    with open("ok.txt", "w") as f:
        f.write("fine")
    out["write_tmp"] = "OK"

    def write(path: str) -> Callable[[], object]:
        return lambda: open(path, "w").close()

    out["write_etc"] = _errno_of(write("/etc/sandbox-test-escape"))
    out["write_dotdot"] = _errno_of(write("../etc/sandbox-test-escape"))
    out["write_proc_self"] = _errno_of(write("/proc/self/oom_score_adj"))
    out["write_workdir"] = _errno_of(write(os.path.join(os.path.dirname(__file__), "x")))
    os.symlink("/etc/hostname", "link")
    out["write_symlink"] = _errno_of(write("link"))
    out["hardlink"] = _errno_of(lambda: os.link("/etc/hostname", "hard"))
    out["mkdir_root"] = _errno_of(lambda: os.mkdir("/sandbox-test-escape"))
    def fill() -> None:
        with open("big", "wb") as f:
            f.write(b"x" * (2 << 20))

    out["tmp_full"] = _errno_of(fill)

    def connect(family: int, addr: Any, kind: int = socket.SOCK_STREAM) -> Callable[[], None]:
        def go() -> None:
            with socket.socket(family, kind) as s:
                s.settimeout(5)
                s.connect(addr)
        return go

    out["tcp_loopback"] = _errno_of(connect(socket.AF_INET, ("127.0.0.1", 22)))
    out["tcp6_loopback"] = _errno_of(connect(socket.AF_INET6, ("::1", 22)))
    out["netlink"] = _errno_of(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW))
    out["packet"] = _errno_of(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))
    out["abstract_unix"] = _errno_of(connect(socket.AF_UNIX, "\0sandbox-test-isolation"))
    out["mount"] = _errno_of(lambda: _check_raw("mount", b"none", b"/tmp", b"tmpfs", 0, None))
    out["unshare_user"] = _raw("unshare", ctypes.c_long(iso.CLONE_NEWUSER))
    out["setns"] = _raw("setns", ctypes.c_long(0), ctypes.c_long(0))
    out["clone_newns"] = _raw("clone", ctypes.c_long(iso.CLONE_NEWNS | signal.SIGCHLD),
                              None, None, None, None)
    out["clone3"] = _raw("clone3", None, ctypes.c_long(0))
    out["ptrace"] = _raw("ptrace", ctypes.c_long(16), ctypes.c_long(1), None, None)  # ATTACH
    out["bpf"] = _raw("bpf", ctypes.c_long(0), None, ctypes.c_long(0))
    out["io_uring"] = _raw("io_uring_setup", ctypes.c_long(1), None)
    out["keyctl"] = _raw("keyctl", ctypes.c_long(0), ctypes.c_long(0))
    out["tiocsti"] = _raw("ioctl", ctypes.c_long(0), ctypes.c_long((1 << 32) | iso.TIOCSTI),
                          ctypes.c_char_p(b"x"))
    out["setuid0"] = _errno_of(lambda: os.setuid(0))
    out["kill_init_of_host"] = _errno_of(lambda: os.kill(1 if os.getpid() != 1 else 2, 0))
    return out


def _check_raw(name: str, *args: Any) -> None:
    nr = iso._NR[name]
    if libc.syscall(ctypes.c_long(nr), *args) == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@needs_root
@pytest.mark.skipif(LANDLOCK_ABI < 6, reason=f"Landlock ABI {LANDLOCK_ABI} < 6 (scopes)")
def test_all_layers_inside_and_outside(netns_fd: int) -> None:
    config = iso.IsolationConfig(tmp_size_bytes=1 << 20)
    ids = iso.worker_ids(config, 7)
    ours = iso.namespace_ids()
    seen: dict[str, Any] = {}

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0sandbox-test-isolation")
    listener.listen(1)

    def outside(worker: Worker) -> None:
        tasks = os.listdir(f"/proc/{worker.pid}/task")
        assert tasks
        for tid in tasks:
            with open(f"/proc/{worker.pid}/task/{tid}/status") as f:
                status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
            assert iso.check_status(status, config, ids, f"task {tid}") == []
            assert status["Uid"].split() == [str(ids.uid)] * 4
            assert int(status["CapEff"], 16) == int(status["CapBnd"], 16) == 0
            assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
        theirs = iso.namespace_ids(worker.pid)
        for layer in ("mount_ns", "pid_ns", "net_ns", "ipc_ns", "uts_ns"):
            assert theirs[layer] != ours[layer], layer
        assert theirs["net_ns"] == os.fstat(netns_fd).st_ino   # the shared one
        fds = {int(fd) for fd in os.listdir(f"/proc/{worker.pid}/fd")}
        assert fds <= worker.allowed_fds, fds
        seen["fds"] = len(fds)

    try:
        report = run_worker(config, _inside, netns_fd=netns_fd, inspect=outside).report
    finally:
        listener.close()
    assert seen["fds"] <= 5
    assert report["uid"] == ids.uid != 0 and report["gid"] == ids.gid
    assert report["cwd"] == report["home"] == "/tmp"
    assert report["pid"] == 1 and report["ppid"] == 0
    assert report["procs"] == [1]
    assert report["hostname"] == "sandbox"
    assert report["shm"] == []
    assert report["write_tmp"] == "OK"
    for key in ("write_etc", "write_dotdot", "write_proc_self", "write_workdir",
                "write_symlink", "hardlink", "mkdir_root"):
        # (ENOENT for the work dir when the checkout lives under /tmp: it is not there at all
        # in the worker's view, unless exposed, and then read-only)
        denied = ("EROFS", "EACCES", "EPERM", "EXDEV") + (("ENOENT",) if key == "write_workdir"
                                                         else ())
        assert report[key] in denied, (key, report[key])
    assert not os.path.exists(os.path.join(os.path.dirname(__file__), "x"))
    assert report["tmp_full"] in ("ENOSPC", "EFBIG")
    for key in ("tcp_loopback", "tcp6_loopback", "netlink", "packet"):
        assert report[key] in ("EPERM", "EACCES", "ENETUNREACH", "EAFNOSUPPORT"), key
    # The listener lives in our network namespace: from the worker's the name is unknown.
    assert report["abstract_unix"] in ("ECONNREFUSED", "EPERM")
    for key in ("mount", "unshare_user", "setns", "clone_newns", "ptrace", "bpf", "io_uring",
                "keyctl", "tiocsti", "setuid0"):
        assert report[key] == "EPERM", (key, report[key])
    assert report["clone3"] == "ENOSYS"
    assert report["kill_init_of_host"] == "ESRCH"


@needs_root
def test_network_namespace_alone_blocks_loopback(netns_fd: int) -> None:
    config = iso.IsolationConfig(landlock=False, seccomp=False)

    def body() -> dict[str, Any]:
        return {"tcp": _errno_of(lambda: socket.create_connection(("127.0.0.1", 22), 5)),
                "uid": os.getuid()}

    report = run_worker(config, body, netns_fd=netns_fd).report
    assert report["tcp"] == "ENETUNREACH"
    assert report["uid"] != 0


@needs_root
def test_fresh_netns_and_network_allowed_configs() -> None:
    fresh = run_worker(iso.IsolationConfig(),
                       lambda: {"net": iso.namespace_ids()["net_ns"]}).report
    assert fresh["net"] != iso.namespace_ids()["net_ns"]
    allowed = iso.IsolationConfig(net_ns=False, allow_network=True)

    def body() -> dict[str, Any]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM):
            pass
        return {"net": iso.namespace_ids()["net_ns"]}

    assert run_worker(allowed, body).report["net"] == iso.namespace_ids()["net_ns"]


@needs_root
@pytest.mark.skipif(LANDLOCK_ABI < 6, reason=f"Landlock ABI {LANDLOCK_ABI} < 6 (scopes)")
def test_landlock_scopes_abstract_socket_in_shared_netns() -> None:
    """With the network allowed the worker shares our netns: Landlock's scope still denies."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0sandbox-test-isolation-scope")
    listener.listen(1)

    def body() -> dict[str, Any]:
        def go() -> None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect("\0sandbox-test-isolation-scope")
        return {"abstract": _errno_of(go),
                "signal_parent": _errno_of(lambda: os.kill(os.getppid(), 0))}

    config = iso.IsolationConfig(net_ns=False, allow_network=True, pid_ns=False)
    try:
        report = run_worker(config, body).report
    finally:
        listener.close()
    assert report["abstract"] == "EPERM"
    assert report["signal_parent"] == "EPERM"


@needs_root
def test_posture_check_lists_every_mismatch() -> None:
    config = iso.IsolationConfig(landlock=False, seccomp=False, filesystem=False)
    # Claim stronger layers than applied: the check must name each gap.
    claimed = replace(config, seccomp=True, filesystem=True)

    def body() -> dict[str, Any]:
        try:
            iso.posture_check(claimed, iso.worker_ids(config, 7),
                              host_namespaces=iso.namespace_ids(), allowed_fds={0, 1, 2})
        except iso.PostureError as exc:
            return {"mismatches": exc.mismatches}
        return {"mismatches": []}

    text = " | ".join(run_worker(config, body).report["mismatches"])
    for needle in ("Seccomp", "mount_ns", "fds:", "read-only"):
        assert needle in text, text


def test_user_namespace_path_without_root() -> None:
    """Non-root: the zygote enters a user namespace, then everything else works the same."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child plays a non-root zygote
        try:
            os.close(r)
            if ROOT:
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
            iso.enter_user_namespace()
            try:
                iso.fork_in_new_pid_namespace()
                os.write(w, b'{"error": "forked without a restorable pid namespace"}\n')
                os._exit(0)
            except IsolationUnavailable:
                pass
            detected = iso.detect(iso.IsolationConfig(mode="best-effort", expose=()))
            assert not detected.layers["pid_ns"].available
            config = detected.effective
            assert not config.pid_ns and config.mount_ns and config.credentials
            def body() -> dict[str, Any]:
                with open("/proc/self/status") as f:
                    caps = f.read().split("CapEff:\t")[1][:16]
                return {"uid": os.getuid(), "caps": caps}

            def send(worker: Worker) -> None:
                os.write(w, json.dumps(worker.report).encode() + b"\n")

            run_worker(config, body, inspect=send)
        except BaseException:
            os.write(w, json.dumps({"error": traceback.format_exc()}).encode() + b"\n")
        finally:
            os._exit(0)
    os.close(w)
    try:
        report = _read_json(r, pid)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    if "error" in report and "Permission denied" in report["error"] and "uid_map" in report[
            "error"]:
        pytest.skip("user namespaces are not available to unprivileged users here")
    assert "error" not in report, report.get("error")
    assert report["caps"] == "0" * 16
    assert report["uid"] == (65534 if ROOT else os.getuid())
