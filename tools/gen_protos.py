#!/usr/bin/env python3
"""Regenerate ``sandbox/_proto`` from ``protos/``, or check that it has not drifted.

    python tools/gen_protos.py            # regenerate
    python tools/gen_protos.py --check    # exit 1 with a diff if the committed files differ

The code is generated with ``grpc_tools.protoc`` (``--python_out --pyi_out
--grpc_python_out``) into a temporary directory, then its imports of our own protos are made
package-relative, so ``sandbox._proto.sandbox.v1.sandbox_pb2`` works without putting
``sandbox/_proto`` on ``sys.path``. The output depends on the grpcio-tools version (it stamps
it in the files): CI and developers must use the same one.
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "sandbox" / "_proto"

_INIT_DOC = '"""Generated from protos/ by tools/gen_protos.py. Do not edit."""\n'
# `from sandbox.v1 import sandbox_pb2 as ...` -> `from . import sandbox_pb2 as ...`: a module
# only ever imports protos of its own package (sandbox.v1) besides google's well-known types.
_ABS_IMPORT = re.compile(r"^from (sandbox\.v1) import ", re.MULTILINE)


def _protoc(out_dir: Path) -> None:
    from grpc_tools import protoc  # type: ignore[import-untyped]  # only this tool needs it

    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    protos = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT}")
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    status = protoc.main(args)
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}")


def generate() -> dict[str, str]:
    """Every file of ``sandbox/_proto`` as it should be: relative path -> text."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _protoc(out)
        files: dict[str, str] = {"__init__.py": _INIT_DOC}
        for path in sorted(out.rglob("*")):
            if not path.is_file():
                continue
            rel = path.relative_to(out)
            text = _ABS_IMPORT.sub("from . import ", path.read_text())
            files[rel.as_posix()] = text
            # Every directory on the way needs an __init__.py to be a regular package.
            for parent in rel.parents:
                if parent != Path("."):
                    files.setdefault((parent / "__init__.py").as_posix(), _INIT_DOC)
    return files


def current() -> dict[str, str]:
    """The files of ``sandbox/_proto`` as committed (caches excluded)."""
    if not OUT_ROOT.exists():
        return {}
    return {
        p.relative_to(OUT_ROOT).as_posix(): p.read_text()
        for p in sorted(OUT_ROOT.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def diff(expected: dict[str, str], actual: dict[str, str]) -> str:
    out: list[str] = []
    for name in sorted(set(expected) | set(actual)):
        want, have = expected.get(name), actual.get(name)
        if want == have:
            continue
        out.extend(difflib.unified_diff(
            (have or "").splitlines(keepends=True),
            (want or "").splitlines(keepends=True),
            fromfile=f"committed/sandbox/_proto/{name}" if have is not None else "/dev/null",
            tofile=f"generated/sandbox/_proto/{name}" if want is not None else "/dev/null",
        ))
    return "".join(out)


def write(files: dict[str, str]) -> None:
    if OUT_ROOT.exists():
        shutil.rmtree(OUT_ROOT)
    for name, text in files.items():
        path = OUT_ROOT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 with a diff if sandbox/_proto is stale")
    args = parser.parse_args(argv)
    expected = generate()
    if args.check:
        delta = diff(expected, current())
        if delta:
            sys.stdout.write(delta)
            print("sandbox/_proto is stale: run `python tools/gen_protos.py`", file=sys.stderr)
            return 1
        print("sandbox/_proto is up to date")
        return 0
    write(expected)
    print(f"wrote {len(expected)} files to {OUT_ROOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
