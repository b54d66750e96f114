"""Without root: containment that does not depend on root, and the suite run as an ordinary user.

The tests in the first part run in both halves of the suite: as root, and (through
:func:`test_suite_as_an_ordinary_user`, which root runs) as an ordinary user, where the
zygote lives in user and pid namespaces of its own. The second part is that run.
"""

from __future__ import annotations

import importlib.metadata
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import userns_allowed
from test_runtime import GRANDCHILD, pids_named

from sandbox import Limits, Outcome, Runtime
from sandbox.doctor import report

REPO = Path(__file__).resolve().parent.parent

#: What the ordinary user's half runs: the runtime and outcome tests, the hostile suite, and
#: this file (the leftover-process guard of conftest.py runs after every one of them).
USER_HALF = ["tests/test_runtime.py", "tests/hostile", "tests/test_unprivileged.py"]


def _wait_dead(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Wait (bounded) for each pid's exit; the ones still alive after ``timeout``."""
    left = []
    for pid in pids:
        try:
            psutil.Process(pid).wait(timeout=timeout)
        except psutil.NoSuchProcess:
            continue
        except psutil.TimeoutExpired:
            left.append(pid)
    return left


def _alive(pid: int) -> bool:
    """Running, or anything but a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _pid_ns(rt: Runtime) -> bool:
    return bool(rt.info()["isolation"]["layers"]["pid_ns"]["enabled"])


@pytest.fixture
def confined() -> Iterator[Runtime]:
    """A runtime with every layer this user may have (strict as root)."""
    runtime = Runtime(min_idle=0, isolation="strict" if os.geteuid() == 0 else "best-effort")
    try:
        if not _pid_ns(runtime):
            pytest.skip("no pid namespace here: "
                        + runtime.info()["isolation"]["layers"]["pid_ns"]["reason"])
        yield runtime
    finally:
        runtime.close()


# -- containment, as whoever runs the suite -------------------------------------------------------

def test_doctor_reports_pid_namespaces_wherever_user_namespaces_are_allowed() -> None:
    data = report()
    pid_ns = data["layers"]["pid_ns"]
    if os.geteuid() == 0:
        assert pid_ns["available"], pid_ns
        return
    if userns_allowed():
        assert pid_ns["available"] and pid_ns["enabled"], pid_ns
        assert "zygote's own" in data["layers"]["user_ns"]["reason"], data["layers"]["user_ns"]
    else:
        assert not pid_ns["available"]
        assert "unprivileged user namespaces refused" in pid_ns["reason"], pid_ns


@pytest.mark.parametrize("reuse", [1, 3])
def test_a_setsid_grandchild_dies_when_its_invocation_ends(confined: Runtime,
                                                           reuse: int) -> None:
    """Whether the worker then exits (reuse=1) or stays for the next call (reuse=3), what
    the invocation started is dead once it has returned, and the worker serves again."""
    name = f"gc{uuid.uuid4().hex[:10]}"
    confined.register("escape", source=GRANDCHILD, reuse=reuse)
    result = confined.invoke("escape", {"mode": "return", "name": name})
    assert result.outcome is Outcome.OK and result.result == "spawned", result.error
    named = pids_named(name)
    assert not _wait_dead(named), f"grandchild {named} outlived its invocation"
    again = confined.invoke("escape", {"mode": "return", "name": name + "b"})
    assert again.outcome is Outcome.OK, again.error
    if reuse > 1:
        assert again.stats.worker_pid == result.stats.worker_pid  # the same worker, reused
    assert not _wait_dead(pids_named(name + "b"))


def test_a_fork_bomb_at_its_process_limit_leaves_a_sibling_free_to_fork(
        confined: Runtime) -> None:
    """One invocation holds every process its limit allows; another, running meanwhile,
    still forks (a pids cgroup each as root; a user namespace each, so RLIMIT_NPROC counts
    apart, without root)."""
    confined.register("bomb", source=src_bomb)
    confined.register("forks", source=src_forks)
    held = confined.stream("bomb", limits=Limits(max_processes=16, wall_timeout_s=120))
    first = next(iter(held))
    assert first["error"] == "EAGAIN" and 0 < first["forked"] < 16, first
    sibling = confined.invoke("forks", 4, limits=Limits(max_processes=16))
    assert sibling.outcome is Outcome.OK and sibling.result == 4, (sibling.result, sibling.error)


src_bomb = """
import errno, os, time
def handler(e, c):
    r, w = os.pipe()
    n = 0
    while True:
        try:
            pid = os.fork()
        except OSError as exc:
            yield {"forked": n, "error": errno.errorcode[exc.errno]}
            break
        if pid == 0:
            os.read(r, 1)
            os._exit(0)
        n += 1
    time.sleep(120)
"""

src_forks = """
import os
def handler(n, c):
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    return n
"""


def test_a_setsid_grandchild_dies_when_the_runtime_closes(confined: Runtime) -> None:
    """An invocation still running when the runtime closes: its double-forked, setsid
    grandchild is dead once ``close()`` has returned, and so is every process of ours."""
    name = f"gc{uuid.uuid4().hex[:10]}"
    confined.register("hang", source=GRANDCHILD.replace(
        'print("spawned", flush=True)', 'yield "spawned"'))
    chunks = confined.stream("hang", {"mode": "stream", "name": name},
                             limits=Limits(wall_timeout_s=120))
    assert next(iter(chunks)) == "spawned"  # the grandchild is set up and named
    named = pids_named(name)
    assert named, "the grandchild is not visible from outside"
    zygote = confined.info()["pools"]["default"]["zygote_pids"]
    confined.close()
    # At once: close() returns when they are gone (zombies, reaped by whoever inherits them).
    assert not [p for p in named if _alive(p)], f"grandchild {named} outlived close()"
    assert not [p for p in zygote if _alive(p)], f"zygote {zygote} outlived close()"


# -- the suite as an ordinary user ----------------------------------------------------------------

def _test_user() -> str | None:
    """``SANDBOX_TEST_USER``, else ``sandbox-ci`` (what CI creates), else ``nobody``."""
    for name in (os.environ.get("SANDBOX_TEST_USER"), "sandbox-ci", "nobody"):
        if not name:
            continue
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid != 0:
            return name
    return None


def _runnable_python(user: str) -> str | None:
    """An interpreter of our major.minor (our compiled dependencies load in it) that the
    user may execute: ours is often under a home directory closed to others."""
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for candidate in (os.path.realpath(sys.executable), f"/usr/bin/python{want}",
                      "/usr/bin/python3"):
        if not os.path.exists(candidate):
            continue
        probe = subprocess.run(
            ["runuser", "-u", user, "--", candidate, "-c",
             "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, timeout=60, cwd="/")
        if probe.returncode == 0 and probe.stdout.strip() == want:
            return candidate
    return None


def _distributions(roots: list[str]) -> set[str]:
    """The installed distributions ``roots`` need, transitively (extras left out)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = re.split(r"[ ;<>=!~\[(]", todo.pop(), maxsplit=1)[0].lower()
        if not name or name in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        seen.add(name)
        todo += [r for r in dist.requires or () if "extra ==" not in r]
    return seen


def _stage(base: Path) -> Path:
    """A copy, readable by anyone, of what the user's half needs: the package, the tests,
    the pytest configuration and the installed files of our dependencies (the checkout and
    the virtual environment may be under a directory closed to other users)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    base.mkdir()
    shutil.copytree(REPO / "sandbox", base / "sandbox", ignore=ignore)
    shutil.copytree(REPO / "tests", base / "tests", ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", base / "pyproject.toml")
    site = base / "site"
    needed = _distributions([*(importlib.metadata.requires("sandbox") or ()), "pytest",
                             "pytest-timeout", "hypothesis", "psutil"])
    needed.discard("sandbox")
    for name in sorted(needed):
        dist = importlib.metadata.distribution(name)
        for file in dist.files or ():
            source = Path(dist.locate_file(file))
            if file.parts[0].endswith(".dist-info") and file.name != "METADATA" \
                    and file.name != "entry_points.txt":
                continue
            if ".." in file.parts or not source.is_file():
                continue
            target = site / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for path in [base, *base.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return base


class UserEnv:
    """An ordinary user, an interpreter it may run, and a staged copy of what it imports."""

    def __init__(self, user: str, python: str, base: Path, home: Path) -> None:
        self.user, self.python, self.base, self.home = user, python, base, home

    def command(self, *argv: str) -> list[str]:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(self.home),
               "LANG": "C.UTF-8", "PYTHONPATH": f"{self.base}:{self.base / 'site'}",
               "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": str(self.home)}
        return ["runuser", "-u", self.user, "--", "env", "-i",
                *(f"{k}={v}" for k, v in env.items()), self.python, *argv]


@pytest.fixture(scope="module")
def user_env() -> Iterator[UserEnv]:
    if os.geteuid() != 0:
        pytest.skip("already an ordinary user: this half is the one running")
    if shutil.which("runuser") is None:
        pytest.skip("no runuser(1) to run the tests as another user")
    user = _test_user()
    if user is None:
        pytest.skip("no ordinary user to run the tests as (set SANDBOX_TEST_USER)")
    python = _runnable_python(user)
    if python is None:
        pytest.skip(f"no Python {sys.version_info[0]}.{sys.version_info[1]} that {user} "
                    "may run (Debian's /usr/bin/python3 would do)")
    entry = pwd.getpwnam(user)
    with tempfile.TemporaryDirectory(prefix="sandbox-user-half-") as tmp:
        # The home (and so pytest's tmp_path) beside the staged import path, not in it:
        # workers see the import path.
        os.chmod(tmp, 0o755)
        base = _stage(Path(tmp) / "stage")
        home = Path(tempfile.mkdtemp(prefix="home-", dir=tmp))
        os.chown(home, entry.pw_uid, entry.pw_gid)
        yield UserEnv(user, python, base, home)


DELEGATED = r"""
import json, sys
from sandbox import Limits, Runtime
BOMB = "def handler(e, c):\n    hoard = []\n    while True:\n        hoard.append(bytearray(8 << 20))\n"
FORKS = ("import os\ndef handler(e, c):\n    n = 0\n    while n < 100:\n        try:\n"
         "            pid = os.fork()\n        except OSError as exc:\n            return n\n"
         "        if pid == 0:\n            os.read(os.pipe()[0], 1)\n        n += 1\n")
with Runtime(min_idle=0, isolation="strict") as rt:
    layers = rt.info()["isolation"]["layers"]
    rt.register("bomb", source=BOMB)
    rt.register("forks", source=FORKS)
    bomb = rt.invoke("bomb", limits=Limits(memory_bytes=64 << 20, wall_timeout_s=30))
    forks = rt.invoke("forks", limits=Limits(max_processes=8, wall_timeout_s=30))
    print(json.dumps({"layers": {k: layers[k] for k in layers if k.startswith("cgroup_")},
                      "bomb": [bomb.outcome.value, bomb.error and bomb.error.type],
                      "forks": [forks.outcome.value, forks.result]}))
"""


def _delegated_groups(user: str) -> list[Path]:
    """As root: a group per cgroup controller we use (and the controller-less v2 one on a
    hybrid machine), chowned to ``user`` with their files: what ``Delegate=yes`` or an
    administrator does. Only hierarchies whose root we may write."""
    from sandbox.cgroups import _parse_mountinfo

    with open("/proc/self/mountinfo") as f:
        mounts = _parse_mountinfo(f.read())
    name = f"sandbox-delegated-{uuid.uuid4().hex[:8]}"
    entry = pwd.getpwnam(user)
    groups = []
    for m in mounts:
        wanted = m.fstype == "cgroup2" or (m.fstype == "cgroup" and m.options & {
            "memory", "pids", "cpuacct"})
        if not wanted or m.read_only or m.root != "/":
            continue
        group = Path(m.point) / name
        group.mkdir()
        groups.append(group)
        for path in [group, *group.iterdir()]:
            os.chown(path, entry.pw_uid, entry.pw_gid)
    return groups


@pytest.mark.timeout(300)
def test_delegated_cgroups_are_used_as_root_uses_its_own(user_env: UserEnv) -> None:
    """An ordinary user started in cgroups delegated to it: strict mode starts, the memory
    limit ends a bomb by the OOM killer and the pids limit stops a fork loop, and the report
    says where the groups are and that they are delegated."""
    groups = _delegated_groups(user_env.user)
    if not groups:
        pytest.skip("no cgroup hierarchy we may delegate from here")
    procs = " ".join(f"{g}/cgroup.procs" for g in groups)
    try:
        run = subprocess.run(
            ["sh", "-c", f'for f in {procs}; do echo $$ > "$f" || exit 97; done; exec "$@"',
             "sh", *user_env.command("-c", DELEGATED)],
            cwd=user_env.home, capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stdout + run.stderr[-4000:]
        import json

        data = json.loads(run.stdout.strip().splitlines()[-1])
        for layer in ("cgroup_memory", "cgroup_pids", "cgroup_cpu"):
            got = data["layers"][layer]
            assert got["enabled"] and "delegated to uid" in got["reason"], (layer, got)
            assert "sandbox-delegated-" in got["reason"], (layer, got)
        assert data["bomb"] == ["MEMORY_LIMIT", "MemoryLimitExceeded"], data
        assert data["forks"][0] == "OK" and 0 < data["forks"][1] < 8, data
    finally:
        for group in groups:
            for _ in range(100):  # the last worker's group goes when it has exited
                try:
                    group.rmdir()
                    break
                except OSError:
                    _wait_dead(pids_in(group))


def pids_in(group: Path) -> list[int]:
    try:
        return [int(p) for p in (group / "cgroup.procs").read_text().split()]
    except OSError:
        return []


@pytest.mark.timeout(900)
def test_suite_as_an_ordinary_user(user_env: UserEnv) -> None:
    """Root runs the runtime, outcome, hostile and leftover tests again as an ordinary user:
    they must pass there too (a layer the kernel denies that user skips, with its reason)."""
    run = subprocess.run(
        user_env.command("-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *USER_HALF),
        cwd=user_env.base, capture_output=True, text=True, timeout=880)
    user, python = user_env.user, user_env.python
    output = run.stdout + run.stderr
    summary = output.strip().splitlines()[-1] if output.strip() else "(no output)"
    assert run.returncode == 0, f"as {user}: {summary}\n{output[-6000:]}"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 100, f"as {user}: too few tests ran: {summary}"
    print(f"as {user} ({python}): {summary}")
