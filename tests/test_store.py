"""The persistent function store: versions, content addressing, validation, persistence."""

from __future__ import annotations

import io
import json
import os
import stat
import zipfile
from pathlib import Path

import pytest

from sandbox.errors import ConfigurationError, FunctionNotFound, InvalidRequest
from sandbox.limits import Limits
from sandbox.store import FunctionStore, detect_format, normalize_handler, profile_name

SOURCE = b"def handler(event, context):\n    return event\n"


def make_zip(entries: dict[str, bytes], *, symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if symlink is not None:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


@pytest.fixture
def store(tmp_path: Path) -> FunctionStore:
    with FunctionStore(tmp_path / "state") as s:
        yield s  # type: ignore[misc]


def test_deploy_python_file(store: FunctionStore) -> None:
    fn = store.deploy("echo", SOURCE, handler="app:handler", preload=["json"],
                      limits=Limits(wall_timeout_s=2.0))
    assert (fn.name, fn.version, fn.handler, fn.preload) == ("echo", 1, "app:handler", ("json",))
    assert fn.source_format == "python" and fn.source_size_bytes == len(SOURCE)
    assert fn.runtime_handler == "handler" and fn.profile == "json"
    path = store.bundle_path(fn)
    assert path == store.root / "bundles" / fn.digest / "app.py"
    assert path.read_bytes() == SOURCE
    assert store.get("echo") == fn


def test_default_and_bare_handlers() -> None:
    assert normalize_handler("", "python") == "main:handler"
    assert normalize_handler("run", "python") == "main:run"
    assert normalize_handler("pkg.mod:run", "zip") == "pkg.mod:run"
    for bad, fmt in [("", "zip"), ("run", "zip"), ("a:b:c", "python"), ("1x:run", "python"),
                     ("pkg.mod:run", "python"), ("m:", "python"), ("m:f.g", "zip")]:
        with pytest.raises(InvalidRequest):
            normalize_handler(bad, fmt)  # type: ignore[arg-type]


def test_redeploy_makes_new_versions_sharing_content(store: FunctionStore) -> None:
    a = store.deploy("f", SOURCE)
    b = store.deploy("f", SOURCE)
    c = store.deploy("f", SOURCE + b"# v3\n")
    assert [a.version, b.version, c.version] == [1, 2, 3]
    assert a.digest == b.digest != c.digest
    assert store.versions("f") == [1, 2, 3]
    assert store.get("f").version == 3
    assert store.get("f", 2) == b
    assert [fn.version for fn in store.functions()] == [3]
    assert [fn.version for fn in store.functions(all_versions=True)] == [1, 2, 3]


def test_unknown_function_or_version(store: FunctionStore) -> None:
    store.deploy("f", SOURCE)
    with pytest.raises(FunctionNotFound, match="no function named 'g'"):
        store.get("g")
    with pytest.raises(FunctionNotFound, match="no version 7"):
        store.get("f", 7)
    with pytest.raises(FunctionNotFound):
        store.delete("f", 7)


def test_delete_versions_and_garbage_collect(store: FunctionStore) -> None:
    a = store.deploy("f", SOURCE)
    b = store.deploy("f", SOURCE)
    c = store.deploy("g", b"x = 1\n")
    assert store.delete("f", 1) == [1]
    assert store.bundle_path(b).exists()  # still used by version 2
    assert store.delete("f") == [2]
    assert not store.bundle_path(a).exists()
    assert not (store.bundles / a.digest).exists()
    assert store.bundle_path(c).exists()
    with pytest.raises(FunctionNotFound):
        store.get("f")
    # version numbers are never reused
    assert store.deploy("f", SOURCE).version == 3


def test_index_survives_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with FunctionStore(state) as s:
        one = s.deploy("f", SOURCE, limits=Limits(memory_bytes=64 << 20, network=True),
                       preload=["numpy", "json"])
        two = s.deploy("f", SOURCE + b"\n")
        zipped = s.deploy("z", make_zip({"pkg/__init__.py": b"", "pkg/mod.py": SOURCE}),
                          handler="pkg.mod:handler")
        s.delete("f", 2)
        s.deploy("f", SOURCE)
    with FunctionStore(state) as s:
        assert s.get("f", 1) == one
        assert s.versions("f") == [1, 3]
        assert s.get("z") == zipped
        assert s.get("f", 1).profile == "json+numpy"
        assert s.deploy("f", SOURCE).version == 4
        with pytest.raises(FunctionNotFound):
            s.get("f", two.version)


def test_index_is_plain_json_written_atomically(store: FunctionStore) -> None:
    store.deploy("f", SOURCE, limits=Limits(wall_timeout_s=1.5))
    data = json.loads(store.index_path.read_text())
    assert data["format"] == 1
    (version,) = data["functions"]["f"]["versions"]
    assert version["limits"] == {"wall_timeout_s": 1.5}
    leftovers = [p for p in store.root.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_reuse_is_stored_and_defaults_to_single_use(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with FunctionStore(state) as s:
        assert s.deploy("single", SOURCE).reuse == 1
        assert s.deploy("unset", SOURCE, reuse=0).reuse == 1  # 0: unset on the wire
        assert s.deploy("reused", SOURCE, reuse=50).reuse == 50
        for bad in (-1, 2**32):
            with pytest.raises(InvalidRequest, match="reuse"):
                s.deploy("bad", SOURCE, reuse=bad)
        data = json.loads(s.index_path.read_text())
        assert data["functions"]["reused"]["versions"][0]["reuse"] == 50
    with FunctionStore(state) as s:
        assert (s.get("single").reuse, s.get("unset").reuse, s.get("reused").reuse) == (1, 1, 50)


def test_index_without_reuse_reads_as_single_use(tmp_path: Path) -> None:
    """Indexes written before `reuse` existed lack the key: backward compatible."""
    state = tmp_path / "state"
    with FunctionStore(state) as s:
        s.deploy("old", SOURCE)
    data = json.loads((state / "index.json").read_text())
    for entry in data["functions"].values():
        for version in entry["versions"]:
            del version["reuse"]
    (state / "index.json").write_text(json.dumps(data))
    with FunctionStore(state) as s:
        assert s.get("old").reuse == 1
        assert s.deploy("old", SOURCE, reuse=3).reuse == 3


def test_missing_bundle_drops_only_that_version(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with FunctionStore(state) as s:
        gone = s.deploy("gone", b"a = 1\n")
        s.deploy("kept", b"b = 2\n")
        s.bundle_path(gone).unlink()
    with FunctionStore(state) as s:
        assert [fn.name for fn in s.functions()] == ["kept"]


def test_corrupt_index_is_a_configuration_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "index.json").write_text("{not json")
    with pytest.raises(ConfigurationError, match="cannot read the function index"):
        FunctionStore(state)
    # the lock was released: the directory can be opened once the index is fixed
    (state / "index.json").unlink()
    FunctionStore(state).close()


def test_one_store_per_state_dir(tmp_path: Path) -> None:
    with FunctionStore(tmp_path) as _, pytest.raises(ConfigurationError, match="in use"):
        FunctionStore(tmp_path)
    FunctionStore(tmp_path).close()


def test_zip_bundle(store: FunctionStore) -> None:
    source = make_zip({"pkg/__init__.py": b"", "pkg/mod.py": SOURCE, "data/x.txt": b"x"})
    assert detect_format(source) == "zip"
    fn = store.deploy("z", source, handler="pkg.mod:handler")
    assert fn.source_format == "zip" and fn.runtime_handler == "pkg.mod:handler"
    assert store.bundle_path(fn).name == "bundle.zip"
    assert store.bundle_path(fn).read_bytes() == source


@pytest.mark.parametrize(("entries", "symlink", "match"), [
    ({"/etc/evil.py": b""}, None, "escapes"),
    ({"../evil.py": b""}, None, "escapes"),
    ({"pkg/../../evil.py": b""}, None, "escapes"),
    ({"m.py": b""}, "link.py", "symbolic link"),
    ({"other.py": b""}, None, "not in the zip"),
])
def test_zip_validation(store: FunctionStore, entries: dict[str, bytes], symlink: str | None,
                        match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        store.deploy("z", make_zip(entries, symlink=symlink), handler="m:handler")
    assert store.functions() == []
    assert os.listdir(store.bundles) == []


def test_size_caps(tmp_path: Path) -> None:
    with FunctionStore(tmp_path, max_source_bytes=1000, max_unpacked_bytes=10_000,
                       max_zip_entries=3) as s:
        with pytest.raises(InvalidRequest, match="1001 bytes"):
            s.deploy("f", b"#" * 1001)
        bomb = make_zip({"m.py": b"0" * 20_000})
        assert len(bomb) < 1000
        with pytest.raises(InvalidRequest, match="unpacks to 20000 bytes"):
            s.deploy("f", bomb, handler="m:f")
        with pytest.raises(InvalidRequest, match="4 entries"):
            s.deploy("f", make_zip({f"{i}.py": b"" for i in range(3)} | {"m.py": b""}),
                     handler="m:f")


def test_bad_inputs(store: FunctionStore) -> None:
    for name in ["", "-x", "a/b", "a b", "x" * 129, "..", "é"]:
        with pytest.raises(InvalidRequest, match="invalid function name"):
            store.deploy(name, SOURCE)
    with pytest.raises(InvalidRequest, match="not UTF-8"):
        store.deploy("f", b"\xff\xfe")
    with pytest.raises(InvalidRequest, match="not a valid zip"):
        store.deploy("f", b"PK\x03\x04garbage", handler="m:f")
    with pytest.raises(InvalidRequest, match="preload"):
        store.deploy("f", SOURCE, preload=["os; rm -rf /"])


def test_profile_names() -> None:
    assert profile_name([]) == "default"
    assert profile_name(["pandas", "numpy", "pandas"]) == "numpy+pandas"
