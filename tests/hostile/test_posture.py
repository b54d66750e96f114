"""Posture, from outside (gVisor's habit): a worker blocked mid-invocation is inspected through
the host's /proc, every thread, and compared with what ``rt.info()["isolation"]`` claims.

The function is a generator that starts threads, yields once (so the test knows it runs) and
blocks; the test then reads ``/proc/<worker>/...`` itself, never trusting the worker's report.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

import pytest
from hostile_support import MiB, host_ns_ids, pids_named, short_tag, src

from sandbox import Limits, Runtime, zygote
from sandbox.isolation import IsolationConfig, WorkerIds, check_status

LIMITS = Limits(wall_timeout_s=60, cpu_time_s=30, memory_bytes=256 * MiB, max_processes=48,
                max_open_files=100, max_file_size_bytes=10 * MiB)
#: Environment variables a worker may see (nothing of the supervisor's environment).
# What the code promises (the zygote's own list, whatever this machine's environment holds),
# plus the two the worker sets for its private tmp.
ALLOWED_ENV = set(zygote.ENVIRONMENT_NAMES) | {"HOME", "TMPDIR"}

BLOCKED = src("""
import threading, time
def handler(e, c):
    name(e["tag"])
    for _ in range(3):
        threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
    yield "running"
    time.sleep(3600)
""")


@pytest.fixture
def secret_rt(monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    monkeypatch.setenv("HOSTILE_SUPERVISOR_SECRET", "do-not-leak")
    runtime = Runtime(min_idle=1)
    try:
        yield runtime
    finally:
        runtime.close()


def _status(path: str) -> dict[str, str]:
    with open(path) as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _limits(pid: int) -> dict[str, tuple[str, str]]:
    out = {}
    with open(f"/proc/{pid}/limits") as f:
        next(f)
        for line in f:
            name = line[:26].strip()
            soft, hard = line[26:].split()[:2]
            out[name] = (soft, hard)
    return out


def test_worker_posture_from_outside(secret_rt: Runtime) -> None:
    rt = secret_rt
    report = rt.info()["isolation"]
    layers = report["layers"]
    enabled = {name for name, layer in layers.items() if layer["enabled"]}
    if not report["root"]:
        pytest.skip("posture from outside is specified for root (own uid per worker)")
    rt.register("blocked", source=BLOCKED)
    tag = short_tag("postr")
    stream = rt.stream("blocked", {"tag": tag}, limits=LIMITS)
    try:
        assert next(stream) == "running"
        (pid,) = pids_named(tag)
        verified: set[str] = set()

        # Every thread: ids, capabilities, NoNewPrivs, seccomp (isolation.check_status).
        config = IsolationConfig(mode="best-effort", **{
            name: name in enabled for name in ("credentials", "landlock", "seccomp")})
        tids = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
        assert len(tids) == 4, f"expected the main thread and 3 others, got {tids}"
        main = _status(f"/proc/{pid}/status")
        uid = int(main["Uid"].split()[0])
        gid = int(main["Gid"].split()[0])
        for tid in tids:
            status = _status(f"/proc/{pid}/task/{tid}/status")
            problems = check_status(status, config, WorkerIds(uid, gid, True), f"thread {tid}")
            assert problems == []
        if "credentials" in enabled:
            assert uid >= 200_000 and gid >= 200_000 and uid != os.getuid()
            assert main["Groups"].strip() == ""
            for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                assert int(main[key], 16) == 0, key
            verified.add("credentials")
        assert main["NoNewPrivs"] == "1"
        if "seccomp" in enabled:
            assert main["Seccomp"] == "2" and int(main.get("Seccomp_filters", "1")) >= 1
            verified.add("seccomp")

        # Namespaces differ from the supervisor's; pid 1 inside its own.
        ours, theirs = host_ns_ids(), host_ns_ids(pid)
        for layer, ns in (("mount_ns", "mnt"), ("pid_ns", "pid"), ("net_ns", "net"),
                          ("ipc_ns", "ipc"), ("uts_ns", "uts")):
            if layer in enabled:
                assert theirs[ns] != ours[ns], f"{ns} namespace is the supervisor's"
                verified.add(layer)
        if "pid_ns" in enabled:
            assert main["NStgid"].split() == [str(pid), "1"], main["NStgid"]
        if "net_ns" in enabled:
            # the shared empty namespace: only a loopback, and it is down
            with open(f"/proc/{pid}/net/dev") as f:
                devices = [line.split(":")[0].strip() for line in f.readlines()[2:]]
            assert devices == ["lo"], devices

        # File descriptors: exactly 0, 1, 2 and the channel 3, none a directory.
        fds = sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
        assert fds == [0, 1, 2, 3], fds
        targets = {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds}
        assert targets[0] == "/dev/null"
        assert targets[1].startswith("pipe:") and targets[2].startswith("pipe:")
        assert targets[3].startswith("socket:")
        for fd in fds:
            assert not stat.S_ISDIR(os.stat(f"/proc/{pid}/fd/{fd}").st_mode), fd

        # rlimits match the invocation's limits.
        limits = _limits(pid)
        assert limits["Max open files"] == ("100", "100")
        assert limits["Max file size"] == (str(10 * MiB), str(10 * MiB))
        assert limits["Max core file size"][0] == "0"
        cpu_soft = int(limits["Max cpu time"][0])
        assert 30 <= cpu_soft <= 32, limits["Max cpu time"]

        # Environment: minimal, nothing of the supervisor's.
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if item)
        keys = {k.decode() for k in env}
        assert "HOSTILE_SUPERVISOR_SECRET" not in keys
        assert keys <= ALLOWED_ENV, keys - ALLOWED_ENV

        # Filesystem: / read-only, private tmpfs writable, /dev/shm hidden (mountinfo).
        if "filesystem" in enabled:
            mounts = {}
            with open(f"/proc/{pid}/mountinfo") as f:
                for line in f:
                    fields = line.split()
                    fstype = fields[fields.index("-") + 1]
                    mounts[fields[4]] = (set(fields[5].split(",")), fstype)
            assert "ro" in mounts["/"][0]
            assert mounts["/tmp"][1] == "tmpfs" and "rw" in mounts["/tmp"][0]
            assert mounts["/dev/shm"][1] == "tmpfs" and "ro" in mounts["/dev/shm"][0]
            rw = [m for m, (opts, _) in mounts.items() if "rw" in opts and m != "/tmp"]
            assert rw == [], f"writable mounts besides /tmp: {rw}"
            assert os.readlink(f"/proc/{pid}/cwd") == "/tmp"
            verified.add("filesystem")

        # cgroups: the worker is in its own group with the invocation's limits.
        manager = rt.async_runtime._host.cgroups
        if manager is not None:
            with open(f"/proc/{pid}/cgroup") as f:
                groups = [line.strip().split(":", 2) for line in f]
            mine = [g for g in groups if manager.name in g[2]]
            assert mine, groups
            for parent in manager.paths:
                leaf = [e.path for e in os.scandir(parent) if e.is_dir()
                        and str(pid) in _read(f"{e.path}/cgroup.procs").split()]
                assert len(leaf) == 1, (parent, leaf)
                if os.path.exists(f"{leaf[0]}/memory.limit_in_bytes"):
                    with open(f"{leaf[0]}/memory.limit_in_bytes") as f:
                        assert int(f.read()) == 256 * MiB
                    verified.add("cgroup_memory")
                elif os.path.exists(f"{leaf[0]}/memory.max"):
                    with open(f"{leaf[0]}/memory.max") as f:
                        assert int(f.read()) == 256 * MiB
                    verified.add("cgroup_memory")
                if os.path.exists(f"{leaf[0]}/pids.max"):
                    with open(f"{leaf[0]}/pids.max") as f:
                        assert int(f.read()) == 48
                    verified.add("cgroup_pids")
                if os.path.exists(f"{leaf[0]}/cpuacct.usage") or \
                        os.path.exists(f"{leaf[0]}/cpu.stat"):
                    verified.add("cgroup_cpu")

        # Landlock leaves no trace in /proc: it is proven by behaviour in the catalogue (the
        # abstract-socket scope, writes outside tmp). Here: the report and the kernel agree.
        if "landlock" in enabled:
            assert report["landlock_abi"] >= 1
            verified.add("landlock")
        claimed = enabled - {"user_ns"}
        assert claimed <= verified, f"claimed but not verified from outside: {claimed - verified}"
    finally:
        stream.cancel()
        stream.result()
