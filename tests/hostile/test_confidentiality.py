"""Confidentiality: a function sees its own code and the runtime, nothing else.

A victim function holds a secret in its code (registered from a file, and from a directory of
modules); the host holds world-readable secrets where a careless sandbox would show them (/srv,
/opt, /home, /var/tmp, a source checkout, the state dir). A snoop function tries every way in
we could think of: the paths themselves, globs over the bundle and temp directories, a walk of
its whole view, ``/proc/*/root`` and ``/proc/*/cwd`` of every process it can see, its mount
table, its open fds, its environment, ``/dev/shm``. Every one must come back empty, and the
secrets must appear nowhere in what it returns.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox import Limits, Outcome, Runtime

SNOOP = '''
import glob, os

def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except (OSError, ValueError):
        return None

def handler(e, c):
    token = e["token"].encode()
    found = []

    def check(where, path):
        data = _read(path)
        if data is not None and token in data:
            found.append(f"{where}: {path}")

    # 1. the exact host paths, and through every /proc/<pid>/root and /cwd we can see
    pids = [p for p in os.listdir("/proc") if p.isdigit()] + ["self", "thread-self"]
    for path in e["paths"]:
        check("path", path)
        for pid in pids:
            check("proc-root", f"/proc/{pid}/root{path}")
            check("proc-cwd", f"/proc/{pid}/cwd/{os.path.basename(path)}")
    # 2. globs where bundles and temp files live
    for pattern in ("/var/tmp/sandbox-bundles-*/**", "/var/tmp/**", "/tmp/**", "/srv/**",
                    "/opt/**", "/home/**", "/root/*", "/dev/shm/*", "/run/**"):
        for path in glob.glob(pattern, recursive=True)[:2000]:
            if os.path.isfile(path):
                check("glob", path)
    # 3. every file of the view outside the system libraries (a name or content match)
    skip = ("/proc", "/sys", "/dev", "/usr", "/etc/ssl")
    for root, dirs, files in os.walk("/"):
        dirs[:] = [d for d in dirs if not os.path.join(root, d).startswith(skip)]
        for name in files:
            path = os.path.join(root, name)
            if e["token"] in name:
                found.append(f"name: {path}")
            elif os.path.getsize(path) < (1 << 20) if os.path.isfile(path) else False:
                check("walk", path)
    # 4. the mount table names no bundle, state or host secret directory
    mounts = _read("/proc/self/mountinfo") or b""
    for directory in e["dirs"]:
        if directory.encode() in mounts:
            found.append(f"mountinfo: {directory}")
    # 5. open fds, 6. the environment
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if any(target.startswith(d) for d in e["dirs"]):
            found.append(f"fd {fd}: {target}")
    if any(token in value.encode() for value in os.environ.values()):
        found.append("environment")
    return {"found": found, "shm": sorted(os.listdir("/dev/shm")),
            "visible": sorted(os.listdir("/"))}
'''


@pytest.fixture
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    token = f"TOPSECRET-{uuid.uuid4().hex}"
    secret = f"API_KEY = {token!r}\n"
    work = tmp_path_factory.mktemp("victims")
    victim_file = work / f"victim_{token[-8:]}.py"
    victim_file.write_text(secret + "def handler(e, c):\n    return API_KEY[:9]\n")
    package = work / "victimdir" / "vpkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text(secret + "def handler(e, c):\n    return API_KEY[:9]\n")
    # World-readable secrets where the host keeps things.
    planted: list[Path] = []
    for base in ("/srv", "/opt", "/home", "/var/tmp"):
        if os.path.isdir(base) and os.access(base, os.W_OK):
            directory = Path(base) / f"sandbox-test-{token[-12:]}"
            directory.mkdir(mode=0o755)
            (directory / "secret.txt").write_text(token)
            (directory / "secret.txt").chmod(0o644)
            planted.append(directory)
    checkout = Path("/srv" if os.access("/srv", os.W_OK) else "/var/tmp") / f"checkout-{token[-12:]}"
    (checkout / "app").mkdir(parents=True)
    (checkout / "app" / "settings.py").write_text(secret)
    planted.append(checkout)
    state = Path("/var/tmp") / f"sandbox-state-{token[-12:]}"
    (state / "functions").mkdir(parents=True)
    (state / "functions" / "index.json").write_text(token)
    planted.append(state)
    try:
        with Runtime(min_idle=1, hide=[str(state)]) as rt:
            yield {"rt": rt, "token": token, "victim_file": victim_file,
                   "victim_dir": work / "victimdir", "planted": planted, "state": state}
    finally:
        for directory in planted:
            shutil.rmtree(directory, ignore_errors=True)


def _minimal_view(rt: Runtime) -> bool:
    return bool(rt.info()["isolation"].get("view", {}).get("minimal"))


def test_functions_see_only_their_own_code(scene: dict[str, Any]) -> None:
    rt: Runtime = scene["rt"]
    if not _minimal_view(rt):
        pytest.skip(f"no minimal filesystem view here: {rt.info()['isolation'].get('view')}")
    token = scene["token"]
    file_fn = rt.register("victim-file", path=scene["victim_file"])
    dir_fn = rt.register("victim-dir", path=scene["victim_dir"], handler="vpkg.mod:handler")
    # The victims themselves work: their code reached them over the channel.
    assert rt.invoke("victim-file").result == "TOPSECRET"
    assert rt.invoke("victim-dir").result == "TOPSECRET"

    rt.register("snoop", source=SNOOP)
    bundle_paths = [file_fn.path, *(str(p) for p in Path(dir_fn.path or "").rglob("*.py"))]
    host_paths = [str(p / "secret.txt") for p in scene["planted"]
                  if (p / "secret.txt").exists()]
    host_paths += [str(p) for d in scene["planted"] for p in d.rglob("*.py")]
    host_paths.append(str(scene["state"] / "functions" / "index.json"))
    paths = [p for p in [*bundle_paths, *host_paths] if p]
    assert all(os.path.exists(p) for p in paths)  # they are there, on the host
    dirs = sorted({os.path.dirname(os.path.dirname(p)) for p in bundle_paths if p}
                  | {str(d) for d in scene["planted"]})
    result = rt.invoke("snoop", {"token": token, "paths": paths, "dirs": dirs},
                       limits=Limits(wall_timeout_s=120))
    assert result.outcome is Outcome.OK, (result.error, result.stderr[-2000:])
    assert result.result["found"] == [], result.result["found"]
    assert result.result["shm"] == []
    assert token not in result.result_bytes.decode("utf-8", "replace")
    assert token not in result.stdout + result.stderr
    # and the view holds none of the host's data directories
    assert not {"srv", "opt", "home", "var", "mnt", "run", "media"} & set(
        result.result["visible"]), result.result["visible"]


def test_the_view_is_reported(scene: dict[str, Any]) -> None:
    rt: Runtime = scene["rt"]
    view = rt.info()["isolation"]["view"]
    if not view["minimal"]:
        pytest.skip(f"no minimal filesystem view here: {view}")
    paths = view["paths"]
    # (an interpreter whose prefix is /usr, as Debian's, brings the whole of /usr)
    assert any(lib == p or lib.startswith(p + "/") for p in paths for lib in ("/usr/lib", "/lib"))
    assert not any(p.startswith(("/srv", "/opt", "/home", "/var/tmp")) for p in paths), paths
    assert str(scene["state"]) in view["hidden"]


def test_bundles_are_private_to_the_supervisor(scene: dict[str, Any]) -> None:
    rt: Runtime = scene["rt"]
    fn = rt.register("victim-private", path=scene["victim_file"])
    assert fn.path is not None
    path = Path(fn.path)
    for item in (path, path.parent, path.parent.parent):
        assert item.stat().st_mode & 0o077 == 0, f"{item} is open to others"
