"""The persistent function store: deployed bundles and their index, under a state directory.

Layout::

    <state-dir>/
        lock                      flock'ed while a store has the directory open (one server)
        index.json                name -> versions; replaced atomically (temp, fsync, rename)
        bundles/<digest>/         content-addressed: <digest> is the sha256 of the source bytes
            <module>.py           a single-file bundle, saved under its handler's module name
            bundle.zip            a zip of modules (validated at deploy)

``index.json``::

    {"format": 1,
     "functions": {"<name>": {"next_version": 3,
                              "versions": [{"version": 1, "digest": "…", "handler": "m:f",
                                            "preload": ["numpy"], "limits": {…},
                                            "created": 1700000000.0, "source_format": "python",
                                            "source_size_bytes": 123, "reuse": 1}, …]}}}

(``reuse`` is absent from indexes written before it existed: it reads as 1, single-use.)

Deploying a name again makes a new version; version numbers are never reused, even after a
delete. Bundles are written before the index that names them, and deleted after the index that
stops naming them, so a crash at any point leaves the index pointing only at complete bundles.

The store only keeps files; it never imports, compiles or runs what it stores. Zips are checked
for what would escape the bundle (absolute paths, ``..``, symlinks) and for size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import re
import stat
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from sandbox._logging import get_logger
from sandbox.errors import ConfigurationError, FunctionNotFound, InvalidRequest
from sandbox.limits import Limits

__all__ = [
    "DEFAULT_HANDLER",
    "FunctionStore",
    "SourceFormat",
    "Store",
    "StoredFunction",
    "detect_format",
    "profile_name",
]

log = get_logger(__name__)

SourceFormat = Literal["python", "zip"]

#: The handler of a single-file bundle deployed without one.
DEFAULT_HANDLER = "main:handler"
INDEX_FORMAT = 1
ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE_RE = re.compile(rf"^{_IDENT}(?:\.{_IDENT})*$")
_FUNCTION_RE = re.compile(rf"^{_IDENT}$")
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")


def profile_name(preload: Iterable[str]) -> str:
    """The preload profile serving a preload list: sorted unique modules joined by ``+``.

    ``[]`` is ``"default"``; ``["pandas", "numpy"]`` is ``"numpy+pandas"``.
    """
    modules = sorted(set(preload))
    return "+".join(modules) if modules else "default"


def detect_format(source: bytes) -> SourceFormat:
    """``"zip"`` when the bytes start with a zip signature, else ``"python"``."""
    return "zip" if source[:4] in (ZIP_MAGIC, EMPTY_ZIP_MAGIC) else "python"


@dataclasses.dataclass(frozen=True, slots=True)
class StoredFunction:
    """One deployed version of a function, as the index records it.

    Attributes:
        name: the name invocations use.
        version: 1 for the first deployment of the name, then one more each time.
        digest: lowercase hex sha256 of the source bytes; the bundle's directory name.
        handler: ``module:function``.
        preload: modules the zygote imports before forking this function's workers.
        limits: the function's default limits (``None`` fields inherit the runtime's).
        created: deployment time, seconds since the epoch.
        source_format: ``"python"`` (one ``.py`` file) or ``"zip"``.
        source_size_bytes: size of the source.
        reuse: invocations one worker serves before it is replaced (1: single-use).
    """

    name: str
    version: int
    digest: str
    handler: str
    preload: tuple[str, ...]
    limits: Limits
    created: float
    source_format: SourceFormat
    source_size_bytes: int
    reuse: int = 1
    #: the fields of its async policy given at deploy (see :class:`sandbox.asyncq.AsyncPolicy`;
    #: None: every field its default). Absent from indexes written before it existed.
    async_policy: dict[str, Any] | None = None

    @property
    def module(self) -> str:
        return self.handler.partition(":")[0]

    @property
    def function(self) -> str:
        return self.handler.partition(":")[2]

    @property
    def profile(self) -> str:
        return profile_name(self.preload)

    @property
    def bundle_file(self) -> str:
        """The bundle's file name inside its digest directory."""
        return f"{self.module}.py" if self.source_format == "python" else "bundle.zip"

    @property
    def runtime_handler(self) -> str:
        """The handler as the runtime's ``register(path=...)`` wants it: the bare function for a
        single ``.py`` file, ``module:function`` for a zip."""
        return self.function if self.source_format == "python" else self.handler

    def to_dict(self) -> dict[str, Any]:
        limits = {k: v for k, v in self.limits.to_dict().items() if v is not None}
        if not self.limits.network:
            limits.pop("network", None)
        return {
            "version": self.version,
            "digest": self.digest,
            "handler": self.handler,
            "preload": list(self.preload),
            "limits": limits,
            "created": self.created,
            "source_format": self.source_format,
            "source_size_bytes": self.source_size_bytes,
            "reuse": self.reuse,
            **({} if self.async_policy is None else {"async_policy": dict(self.async_policy)}),
        }

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any]) -> StoredFunction:
        fmt = data["source_format"]
        if fmt not in ("python", "zip"):
            raise ValueError(f"unknown source_format {fmt!r}")
        digest = str(data["digest"])
        if not _DIGEST_RE.match(digest):
            raise ValueError(f"bad digest {digest!r}")
        reuse = int(data.get("reuse", 1))  # absent in indexes written before it existed
        if reuse < 1:
            raise ValueError(f"bad reuse {reuse!r}")
        return cls(
            name=name,
            version=int(data["version"]),
            digest=digest,
            handler=str(data["handler"]),
            preload=tuple(str(m) for m in data.get("preload", ())),
            limits=Limits.from_dict(data.get("limits", {})),
            created=float(data["created"]),
            source_format=fmt,
            source_size_bytes=int(data["source_size_bytes"]),
            reuse=reuse,
            async_policy=_async_policy(data.get("async_policy")),
        )


def _async_policy(value: Any) -> dict[str, Any] | None:
    """An index's async policy, checked (None when absent)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"bad async_policy {value!r}")
    from sandbox.asyncq import AsyncPolicy

    AsyncPolicy.from_dict(value)  # InvalidRequest is a ValueError
    return dict(value)


class Store(Protocol):
    """What the server needs of a function store: this directory (:class:`FunctionStore`), or
    a fleet's shared one (:class:`sandbox.pgstore.PostgresStore`, mirrored in a directory).

    Reads are local (a bundle is a file under ``root``); ``deploy`` and ``delete`` may fail
    with :class:`~sandbox.errors.StoreUnavailable` where the store is remote.
    """

    root: Path

    def bundle_path(self, fn: StoredFunction) -> Path: ...
    def get(self, name: str, version: int | None = None) -> StoredFunction: ...
    def versions(self, name: str) -> list[int]: ...
    def functions(self, all_versions: bool = False) -> list[StoredFunction]: ...
    def deploy(self, name: str, source: bytes, *, handler: str = "",
               preload: Sequence[str] = (), limits: Limits | None = None,
               source_format: SourceFormat | None = None, created: float | None = None,
               reuse: int = 1, async_policy: dict[str, Any] | None = None
               ) -> StoredFunction: ...
    def delete(self, name: str, version: int | None = None) -> list[int]: ...
    def watch(self, listener: Callable[[list[StoredFunction], list[StoredFunction]], None]
              ) -> None: ...
    def describe(self) -> str: ...
    def close(self) -> None: ...


@dataclasses.dataclass(slots=True)
class _Entry:
    next_version: int = 1
    versions: list[StoredFunction] = dataclasses.field(default_factory=list)


class FunctionStore:
    """Deployed functions, persisted under ``state_dir``. Thread-safe.

    Args:
        state_dir: created if missing. Only one store may have it open at a time (a second
            one raises :class:`ConfigurationError`).
        max_source_bytes: largest source (``.py`` or zip) accepted.
        max_unpacked_bytes: largest total uncompressed size of a zip's entries.
        max_zip_entries: most entries in a zip.

    Raises:
        ConfigurationError: the directory is in use or its index cannot be read.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        max_source_bytes: int = 64 * 1024 * 1024,
        max_unpacked_bytes: int = 256 * 1024 * 1024,
        max_zip_entries: int = 10_000,
    ) -> None:
        self.root = Path(state_dir).resolve()
        self.bundles = self.root / "bundles"
        self.index_path = self.root / "index.json"
        self.max_source_bytes = max_source_bytes
        self.max_unpacked_bytes = max_unpacked_bytes
        self.max_zip_entries = max_zip_entries
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self.bundles.mkdir(parents=True, exist_ok=True)
        # The server's alone: workers get a function's code over their channel, and the
        # runtime hides this directory from their view.
        os.chmod(self.root, 0o700)
        self._lock_fd: int | None = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise ConfigurationError(
                f"state directory {self.root} is in use by another sandbox server") from None
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Release the state directory. Idempotent."""
        with self._lock:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> FunctionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        return str(self.root)

    def watch(self, listener: Callable[[list[StoredFunction], list[StoredFunction]], None]
              ) -> None:
        """Nothing but this server changes a directory store: no listener is ever called."""

    def _load(self) -> None:
        try:
            raw = self.index_path.read_bytes()
        except FileNotFoundError:
            return
        try:
            data = json.loads(raw)
            if data.get("format") != INDEX_FORMAT:
                raise ValueError(f"unknown index format {data.get('format')!r}")
            entries: dict[str, _Entry] = {}
            for name, entry in data["functions"].items():
                versions = [StoredFunction.from_dict(name, v) for v in entry["versions"]]
                entries[name] = _Entry(int(entry["next_version"]), versions)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigurationError(f"cannot read the function index {self.index_path}: "
                                     f"{exc}") from exc
        for name, entry in entries.items():
            kept = []
            for fn in entry.versions:
                if self.bundle_path(fn).is_file():
                    kept.append(fn)
                else:
                    log.error("function %s version %d: bundle %s is missing; version dropped",
                              name, fn.version, self.bundle_path(fn))
            entry.versions = sorted(kept, key=lambda f: f.version)
        self._entries = entries

    # -- queries -----------------------------------------------------------------------------
    def bundle_path(self, fn: StoredFunction) -> Path:
        """The bundle file: ``bundles/<digest>/<module>.py`` or ``.../bundle.zip``."""
        return self.bundles / fn.digest / fn.bundle_file

    def get(self, name: str, version: int | None = None) -> StoredFunction:
        """One version (the latest when ``version`` is None).

        Raises:
            FunctionNotFound: no such function or version.
        """
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or not entry.versions:
                raise FunctionNotFound(f"no function named {name!r}")
            if version is None:
                return entry.versions[-1]
            for fn in entry.versions:
                if fn.version == version:
                    return fn
            raise FunctionNotFound(f"function {name!r} has no version {version} (versions: "
                                   f"{', '.join(str(f.version) for f in entry.versions)})")

    def versions(self, name: str) -> list[int]:
        """Every version of ``name``, oldest first (``[]`` if there is none)."""
        with self._lock:
            entry = self._entries.get(name)
            return [] if entry is None else [fn.version for fn in entry.versions]

    def functions(self, all_versions: bool = False) -> list[StoredFunction]:
        """The functions sorted by name, then version: the latest of each, or every version."""
        with self._lock:
            out: list[StoredFunction] = []
            for name in sorted(self._entries):
                versions = self._entries[name].versions
                if versions:
                    out.extend(versions if all_versions else versions[-1:])
            return out

    # -- changes -----------------------------------------------------------------------------
    def deploy(
        self,
        name: str,
        source: bytes,
        *,
        handler: str = "",
        preload: Sequence[str] = (),
        limits: Limits | None = None,
        source_format: SourceFormat | None = None,
        created: float | None = None,
        reuse: int = 1,
        async_policy: dict[str, Any] | None = None,
    ) -> StoredFunction:
        """Store a bundle and record it as the next version of ``name``.

        ``reuse``: invocations one worker serves before it is replaced (0 means 1, single-use).

        Raises:
            InvalidRequest: bad name, handler, preload module, reuse, or source (too large, not
                UTF-8, not a valid zip, an entry escaping the bundle, the handler's module
                missing).
        """
        handler, preload_t, source_format, digest, reuse = check_deploy(
            name, source, handler=handler, preload=preload, source_format=source_format,
            reuse=reuse, check_zip=self._check_zip, max_source_bytes=self.max_source_bytes)
        with self._lock:
            if self._lock_fd is None:
                raise ConfigurationError("the function store is closed")
            entry = self._entries.setdefault(name, _Entry())
            fn = StoredFunction(
                name=name,
                version=entry.next_version,
                digest=digest,
                handler=handler,
                preload=preload_t,
                limits=limits if limits is not None else Limits(),
                created=time.time() if created is None else created,
                source_format=source_format,
                source_size_bytes=len(source),
                reuse=reuse,
                async_policy=async_policy,
            )
            self._write_bundle(fn, source)
            entry.versions.append(fn)
            entry.next_version += 1
            try:
                self._write_index()
            except BaseException:
                entry.versions.pop()
                entry.next_version -= 1
                raise
            log.info("deployed %s version %d (%s, %d bytes)", name, fn.version, digest[:12],
                     len(source))
            return fn

    def delete(self, name: str, version: int | None = None) -> list[int]:
        """Delete one version, or every version, of ``name``; returns the versions deleted.

        Bundles no other version uses are removed (after the index no longer names them).

        Raises:
            FunctionNotFound: no such function or version.
        """
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or not entry.versions:
                raise FunctionNotFound(f"no function named {name!r}")
            if version is None:
                doomed = list(entry.versions)
            else:
                doomed = [fn for fn in entry.versions if fn.version == version]
                if not doomed:
                    raise FunctionNotFound(f"function {name!r} has no version {version}")
            before = list(entry.versions)
            entry.versions = [fn for fn in entry.versions if fn not in doomed]
            try:
                self._write_index()
            except BaseException:
                entry.versions = before
                raise
            in_use = {(fn.digest, fn.bundle_file)
                      for e in self._entries.values() for fn in e.versions}
            for fn in doomed:
                if (fn.digest, fn.bundle_file) not in in_use:
                    with contextlib.suppress(FileNotFoundError):
                        self.bundle_path(fn).unlink()
                    with contextlib.suppress(OSError):  # not empty: another module name
                        (self.bundles / fn.digest).rmdir()
            return [fn.version for fn in doomed]

    # -- a mirror of a shared store ----------------------------------------------------------
    def unmirrored(self, functions: Sequence[StoredFunction]) -> list[StoredFunction]:
        """Those of ``functions`` that :meth:`mirror` would need a bundle for (not mirrored
        yet, and their bundle not here): to fetch before calling it, outside its lock."""
        with self._lock:
            return self._unmirrored(functions)

    def _unmirrored(self, functions: Sequence[StoredFunction]) -> list[StoredFunction]:
        """:meth:`unmirrored`, the caller holding the lock. Versions mirrored already have
        their bundle: only new ones are looked at."""
        before = {(fn.name, fn.version) for e in self._entries.values() for fn in e.versions}
        return [fn for fn in functions if (fn.name, fn.version) not in before
                and not self.bundle_path(fn).is_file()]

    def mirror(self, functions: Sequence[StoredFunction], next_versions: dict[str, int],
               fetch: Callable[[list[str]], dict[str, bytes]]
               ) -> tuple[list[StoredFunction], list[StoredFunction]]:
        """Make this store hold exactly ``functions`` (the versions a shared store has), as a
        local cache of it: bundles not here yet are fetched (``fetch(digests)`` returns each
        digest's bytes, checked against the digest), bundles no longer named are removed, and
        the index is written, so a restart while the shared store is unreachable still
        serves the last known functions. Returns ``(added, removed)``.

        Raises:
            ConfigurationError: a fetched bundle does not match its digest, or is missing.
        """
        with self._lock:
            if self._lock_fd is None:
                raise ConfigurationError("the function store is closed")
            before = {(fn.name, fn.version): fn for e in self._entries.values()
                      for fn in e.versions}
            after = {(fn.name, fn.version): fn for fn in functions}
            new = self._unmirrored(list(after.values()))
            missing = sorted({fn.digest for fn in new})
            sources = fetch(missing) if missing else {}
            for fn in new:
                if self.bundle_path(fn).is_file():
                    continue
                source = sources.get(fn.digest)
                if source is None or hashlib.sha256(source).hexdigest() != fn.digest:
                    raise ConfigurationError(
                        f"bundle {fn.digest} of {fn.name} version {fn.version} is missing from "
                        "the shared store or does not match its digest")
                self._write_bundle(fn, source)
            entries: dict[str, _Entry] = {}
            for fn in sorted(functions, key=lambda f: (f.name, f.version)):
                entry = entries.setdefault(fn.name, _Entry(next_versions.get(fn.name, 1)))
                entry.versions.append(fn)
                entry.next_version = max(entry.next_version, fn.version + 1)
            for name, next_version in next_versions.items():
                entries.setdefault(name, _Entry(next_version))
            self._entries = entries
            self._write_index()
            kept = {(fn.digest, fn.bundle_file) for fn in functions}
            for key, fn in before.items():
                if key not in after and (fn.digest, fn.bundle_file) not in kept:
                    with contextlib.suppress(FileNotFoundError):
                        self.bundle_path(fn).unlink()
                    with contextlib.suppress(OSError):  # not empty: another module name
                        (self.bundles / fn.digest).rmdir()
            return ([fn for key, fn in after.items() if key not in before],
                    [fn for key, fn in before.items() if key not in after])

    # -- internals ---------------------------------------------------------------------------
    def _check_zip(self, source: bytes, module: str) -> None:
        try:
            archive = zipfile.ZipFile(io.BytesIO(source))
        except (zipfile.BadZipFile, ValueError, OSError) as exc:
            raise InvalidRequest(f"source is not a valid zip: {exc}") from None
        with archive:
            infos = archive.infolist()
            if len(infos) > self.max_zip_entries:
                raise InvalidRequest(f"zip has {len(infos)} entries; the limit is "
                                     f"{self.max_zip_entries}")
            total = 0
            names = set()
            for info in infos:
                check_zip_member(info)
                total += info.file_size
                names.add(info.filename)
            if total > self.max_unpacked_bytes:
                raise InvalidRequest(f"zip unpacks to {total} bytes; the limit is "
                                     f"{self.max_unpacked_bytes}")
        path = module.replace(".", "/")
        if f"{path}.py" not in names and f"{path}/__init__.py" not in names:
            raise InvalidRequest(f"handler module {module!r} is not in the zip (expected "
                                 f"{path}.py or {path}/__init__.py)")

    def _write_bundle(self, fn: StoredFunction, source: bytes) -> None:
        target = self.bundle_path(fn)
        with contextlib.suppress(FileNotFoundError):
            if hashlib.sha256(target.read_bytes()).hexdigest() == fn.digest:
                return  # content-addressed: the same bytes are already there
        target.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(target, source)

    def _write_index(self) -> None:
        data = {
            "format": INDEX_FORMAT,
            "functions": {
                name: {"next_version": e.next_version,
                       "versions": [fn.to_dict() for fn in e.versions]}
                for name, e in sorted(self._entries.items())
            },
        }
        # Compact: ``indent`` would make json fall back from its C encoder to the Python one,
        # ten times slower, and a fleet's mirror writes this index on every change.
        _atomic_write(self.index_path,
                      json.dumps(data, sort_keys=True, separators=(",", ":")).encode())


def check_deploy(name: str, source: bytes, *, handler: str, preload: Sequence[str],
                 source_format: SourceFormat | None, reuse: int,
                 check_zip: Callable[[bytes, str], None], max_source_bytes: int
                 ) -> tuple[str, tuple[str, ...], SourceFormat, str, int]:
    """Everything a store checks before it keeps a deployment, in one place for every store.

    Returns ``(handler, preload, source_format, digest, reuse)`` as stored.

    Raises:
        InvalidRequest: bad name, handler, preload module, reuse, or source.
    """
    check_name(name)
    reuse = check_reuse(reuse)
    if source_format is None:
        source_format = detect_format(source)
    if len(source) > max_source_bytes:
        raise InvalidRequest(f"source is {len(source)} bytes; the limit is {max_source_bytes}")
    handler = normalize_handler(handler, source_format)
    preload_t = tuple(dict.fromkeys(preload))
    for module in preload_t:
        if not _MODULE_RE.match(module):
            raise InvalidRequest(f"preload: {module!r} is not a module name")
    if source_format == "python":
        try:
            source.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"source is not UTF-8 Python: {exc}") from None
    else:
        check_zip(source, handler.partition(":")[0])
    return handler, preload_t, source_format, hashlib.sha256(source).hexdigest(), reuse


def check_name(name: str) -> None:
    """Raises InvalidRequest unless ``name`` is a valid function name."""
    if not _NAME_RE.match(name):
        raise InvalidRequest(
            f"invalid function name {name!r}: use letters, digits, '_', '-' and '.', starting "
            "with a letter or digit, at most 128 characters")


#: The largest ``reuse`` a deployment may ask for (the wire field is a uint32).
MAX_REUSE = 2**32 - 1


def check_reuse(reuse: int) -> int:
    """``reuse`` as stored: 0 (unset on the wire) means 1; raises InvalidRequest when negative
    or too large."""
    reuse = int(reuse)
    if reuse < 0 or reuse > MAX_REUSE:
        raise InvalidRequest(f"reuse must be between 0 (single-use) and {MAX_REUSE}, got {reuse}")
    return max(1, reuse)


def normalize_handler(handler: str, source_format: SourceFormat) -> str:
    """``module:function`` for a handler as deployed (see ``DeployRequest.handler``).

    Raises:
        InvalidRequest: the handler is malformed, or a zip's handler lacks its module.
    """
    if not handler:
        if source_format == "zip":
            raise InvalidRequest("a zip bundle needs a handler 'module:function'")
        return DEFAULT_HANDLER
    module, sep, function = handler.partition(":")
    if not sep:
        if source_format == "zip":
            raise InvalidRequest(f"handler {handler!r}: a zip bundle needs 'module:function'")
        module, function = "main", handler
    if source_format == "python" and not _FUNCTION_RE.match(module):
        raise InvalidRequest(f"handler {handler!r}: the module of a single-file bundle must be "
                             "a plain identifier")
    if not _MODULE_RE.match(module) or not _FUNCTION_RE.match(function):
        raise InvalidRequest(f"invalid handler {handler!r}: expected 'module:function'")
    return f"{module}:{function}"


def check_zip_member(info: zipfile.ZipInfo) -> None:
    """Raises InvalidRequest for a zip entry that could escape the bundle or not be imported."""
    name = info.filename
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise InvalidRequest(f"zip entry {name!r} escapes the bundle (absolute path or '..')")
    if "\\" in name or "\x00" in name:
        raise InvalidRequest(f"zip entry {name!r} has a backslash or NUL in its name")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise InvalidRequest(f"zip entry {name!r} is a symbolic link")
    if info.flag_bits & 0x1:
        raise InvalidRequest(f"zip entry {name!r} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise InvalidRequest(f"zip entry {name!r}: only stored and deflated entries can be "
                             "imported")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old or the new file, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
