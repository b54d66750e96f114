"""Functions: what a worker needs to find and call a handler.

A function is registered under a name from one of five kinds of source; each registration of a
name makes a new version, identified also by a content digest (sha256)::

    kind        given as                           handler means             worker loads it by
    source      Python source text                 "function" (default       exec into a fresh
                                                   "handler")                module
    file        a path to one ``.py`` file          "function"                import from the file
    directory   a path to a directory of modules   "module:function"         sys.path + import
    zip         a path to a ``.zip`` of modules    "module:function"         zipimport
    ref         "module:function" importable       (the ref itself)          import
                where the runtime runs

The descriptor sent to the worker (:meth:`FunctionInfo.descriptor`) carries the function's code
itself: a worker never reads a bundle from disk (bundles are private to the supervisor, and a
function sees no other function's code). ``source`` and ``file``: the code compiled here
(marshal; the text only when it does not compile, for the worker to report the SyntaxError).
``directory`` and ``zip``: the snapshot's files as one msgpack archive (built once per version),
which the worker unpacks into its private ``/tmp`` and imports from. ``ref``: the name of a
module importable in the worker's view. Nothing of the function runs in the supervisor.
"""

from __future__ import annotations

import compileall
import dataclasses
import functools
import hashlib
import marshal
import os
import py_compile
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from sandbox.errors import ConfigurationError
from sandbox.limits import Limits

__all__ = ["FunctionInfo", "make_function"]

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = re.compile(rf"^{_IDENT}(\.{_IDENT})*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
#: Largest source text accepted inline.
MAX_SOURCE_BYTES = 8 * 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class FunctionInfo:
    """A registered function version.

    Attributes:
        name: the name it is invoked by.
        version: 1 for the first registration of the name, then 2, 3...
        digest: sha256 (hex) of the function's content.
        kind: ``source``, ``file``, ``directory``, ``zip`` or ``ref``.
        handler: ``"module:function"`` (or the function name for ``source``/``file``).
        profile: the preload profile whose zygote forks its workers.
        limits: the function's default limits (fields left None inherit the runtime's).
        reuse: how many invocations one worker may serve (1: a fresh process every time).
        path: the file, directory or zip it is loaded from (None for source and ref).
    """

    name: str
    version: int
    digest: str
    kind: str
    handler: str
    profile: str
    limits: Limits
    reuse: int
    path: str | None = None
    source: str | None = dataclasses.field(default=None, repr=False)
    #: ``source`` compiled once here (marshal), so each fresh worker skips ``compile()``
    code: bytes | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def key(self) -> str:
        """Identifies this exact version in a worker's cache of loaded handlers."""
        return f"{self.name}@{self.version}:{self.digest[:16]}"

    def descriptor(self) -> dict[str, Any]:
        """What the worker needs to load the handler (the same dict every call)."""
        return _descriptor(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "kind": self.kind,
            "handler": self.handler,
            "profile": self.profile,
            "limits": self.limits.to_dict(),
            "reuse": self.reuse,
            "path": self.path,
        }


# As many as bundle_archive keeps: a descriptor holds its version's archive.
@functools.lru_cache(maxsize=64)
def _descriptor(info: FunctionInfo) -> dict[str, Any]:
    module, _, attr = info.handler.rpartition(":")
    archive, entry = b"", ""
    if info.kind in ("directory", "zip") and info.path:
        archive, entry = bundle_archive(info.path, info.digest)
    return {
        "key": info.key,
        "name": info.name,
        "version": info.version,
        "kind": info.kind,
        "module": module,
        "attr": attr,
        # For tracebacks only: the worker cannot see this path.
        "path": os.path.basename(info.path) if info.path else "",
        # The worker compiles the source only when it did not compile here (to report the
        # SyntaxError): send one or the other, not both, on every call.
        "source": "" if info.code else info.source or "",
        "code": info.code or b"",
        "archive": archive,
        "entry": entry,
    }


#: Largest bundle sent to a worker (the snapshot's files, for each call of a fresh worker).
MAX_BUNDLE_BYTES = 64 * 1024 * 1024


@functools.lru_cache(maxsize=64)
def bundle_archive(path: str, digest: str) -> tuple[bytes, str]:
    """A directory or zip bundle as sent to a worker: a msgpack list of ``[relative path,
    bytes]`` (directories first implied), and the entry to put on ``sys.path`` relative to
    where the worker unpacks it. Built once per version (``digest``)."""
    import msgpack

    root = Path(path)
    files: list[list[Any]] = []
    total = 0
    if root.is_dir():
        for item in sorted(root.rglob("*")):
            if item.is_file() and not item.is_symlink():
                data = item.read_bytes()
                total += len(data)
                files.append([item.relative_to(root.parent).as_posix(), data])
        entry = root.name
    else:
        data = root.read_bytes()
        total = len(data)
        files.append([root.name, data])
        entry = root.name
    if total > MAX_BUNDLE_BYTES:
        raise ConfigurationError(f"bundle {root.name!r} is {total} bytes; at most "
                                 f"{MAX_BUNDLE_BYTES} are sent to a worker")
    return msgpack.packb(files, use_bin_type=True), entry


def _compile(text: str, name: str, filename: str = "") -> bytes | None:
    """The marshalled code object of a source function, or None if it does not compile (the
    worker then compiles it and reports the SyntaxError as the function's error)."""
    try:
        code = compile(text, _code_filename(name, filename), "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    return marshal.dumps(code)


def _code_filename(name: str, filename: str = "") -> str:
    """What tracebacks show for a function's code (shared with the worker's own compile)."""
    return f"<function {name}: {filename}>" if filename else f"<function {name}>"


def _check_handler(handler: str, *, dotted_module: bool) -> None:
    module, sep, attr = handler.rpartition(":")
    if dotted_module:
        if not sep or not _DOTTED.match(module) or not re.fullmatch(_IDENT, attr):
            raise ConfigurationError(
                f"handler {handler!r} must be 'module:function' (e.g. 'app.main:handler')")
    elif sep or not re.fullmatch(_IDENT, attr):
        raise ConfigurationError(
            f"handler {handler!r} must be a function name (e.g. 'handler') for a single file")


def _digest_directory(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        rel = path.relative_to(root).as_posix().encode()
        h.update(len(rel).to_bytes(4, "big") + rel)
        data = path.read_bytes()
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


def _snapshot(source: Path, digest: str, bundle_dir: str | None, name: str) -> str:
    """Copy a bundle to ``bundle_dir/<digest>/<name>`` (once), readable by the supervisor only.
    """
    if bundle_dir is None:
        return str(source)
    if not re.fullmatch(r"[0-9a-f]{16,128}", digest):
        raise ConfigurationError(f"digest {digest!r} is not a hex sha256")
    home = Path(bundle_dir) / digest
    target = home / name
    if target.exists():
        return str(target)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=bundle_dir))
    try:
        if source.is_dir():
            shutil.copytree(source, staging / name, symlinks=False,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copyfile(source, staging / name)
        # Byte-compile once here, unchecked-hash pycs (valid whatever the mtimes of the files
        # a worker unpacks): without them every fresh worker would compile every module.
        if source.is_dir():
            compileall.compile_dir(
                str(staging / name), quiet=2, workers=1,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        # Private to the supervisor: workers get the code over their channel, never the path.
        for root, dirs, files in os.walk(staging):
            os.chmod(root, 0o700)
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o700)
            for f in files:
                os.chmod(os.path.join(root, f), 0o600)
        try:
            os.rename(staging, home)
        except OSError:
            if not target.exists():  # not a concurrent registration of the same content
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def make_function(
    name: str,
    version: int,
    *,
    source: str | bytes | None = None,
    path: str | os.PathLike[str] | None = None,
    ref: str | None = None,
    handler: str | None = None,
    profile: str = "default",
    limits: Limits | None = None,
    reuse: int = 1,
    digest: str | None = None,
    bundle_dir: str | None = None,
) -> FunctionInfo:
    """Validate a registration and describe it.

    With ``bundle_dir``, a file, directory or zip is copied to ``bundle_dir/<digest>/`` and
    loaded from there: the registered version is a snapshot (editing the original later does
    not change it), and workers, which see their own ``/tmp`` and run as other uids, can read
    it.

    Raises:
        ConfigurationError: the name, handler, source or path is not usable; the message says
            which and why.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigurationError(
            f"function name {name!r} must be 1-128 characters of letters, digits, '_', '-', "
            "'.', starting with a letter or digit")
    given = [x is not None for x in (source, path, ref)]
    if sum(given) != 1:
        raise ConfigurationError("give exactly one of source=, path= or ref=")
    if isinstance(reuse, bool) or not isinstance(reuse, int) or reuse < 1:
        raise ConfigurationError(f"reuse must be an int >= 1, got {reuse!r}")
    limits = limits if limits is not None else Limits()
    if not isinstance(limits, Limits):
        raise ConfigurationError(f"limits must be a sandbox.Limits, got {type(limits).__name__}")
    common: dict[str, Any] = {"name": name, "version": version, "profile": profile,
                              "limits": limits, "reuse": reuse}

    if source is not None:
        text = source.decode("utf-8") if isinstance(source, bytes) else source
        if len(text.encode("utf-8")) > MAX_SOURCE_BYTES:
            raise ConfigurationError(f"source is over {MAX_SOURCE_BYTES} bytes")
        fn = handler or "handler"
        _check_handler(fn, dotted_module=False)
        return FunctionInfo(kind="source", handler=fn, source=text, code=_compile(text, name),
                            digest=digest or hashlib.sha256(text.encode()).hexdigest(), **common)

    if ref is not None:
        _check_handler(ref, dotted_module=True)
        if handler is not None and handler != ref:
            raise ConfigurationError("with ref=, do not give handler= (the ref is the handler)")
        return FunctionInfo(kind="ref", handler=ref,
                            digest=digest or hashlib.sha256(ref.encode()).hexdigest(), **common)

    assert path is not None
    p = Path(path).resolve()
    if not p.exists():
        raise ConfigurationError(f"path {str(path)!r} does not exist")
    if p.is_dir():
        if handler is None:
            raise ConfigurationError(f"handler= ('module:function') is required for the "
                                     f"directory {str(p)!r}")
        _check_handler(handler, dotted_module=True)
        digest = digest or _digest_directory(p)
        return FunctionInfo(kind="directory", handler=handler,
                            path=_snapshot(p, digest, bundle_dir, p.name), digest=digest,
                            **common)
    if p.suffix == ".py":
        fn = handler or "handler"
        if ":" in fn:
            module, _, fn = fn.rpartition(":")
            if module != p.stem:
                raise ConfigurationError(
                    f"handler {handler!r} names module {module!r}, but the file is {p.name!r}")
        _check_handler(fn, dotted_module=False)
        data = p.read_bytes()
        digest = digest or hashlib.sha256(data).hexdigest()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigurationError(f"{p.name!r} is not UTF-8 text") from None
        return FunctionInfo(kind="file", handler=f"{p.stem}:{fn}",
                            path=_snapshot(p, digest, bundle_dir, p.name), digest=digest,
                            source=text, code=_compile(text, name, p.name), **common)
    if zipfile.is_zipfile(p):
        if handler is None:
            raise ConfigurationError(f"handler= ('module:function') is required for the "
                                     f"zip {str(p)!r}")
        _check_handler(handler, dotted_module=True)
        digest = digest or hashlib.sha256(p.read_bytes()).hexdigest()
        return FunctionInfo(kind="zip", handler=handler,
                            path=_snapshot(p, digest, bundle_dir, "bundle.zip"), digest=digest,
                            **common)
    raise ConfigurationError(
        f"path {str(p)!r} is neither a .py file, a directory nor a zip archive")
