"""Regenerate the Python code for the protobuf contract: ``python proto/generate.py [--check]``.

protoc names generated modules after the proto package (``budgetwarden.v1``); we ship them as the separate package
``budgetwarden_api`` (in the ``budgetwarden-client`` distribution, ``clients/python/``) so generated code never mixes
with the hand-written packages, and rewrite the imports accordingly. ``--check`` regenerates into a temporary directory
and fails if the committed code differs.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
# Generated code ships in the client distribution (clients/python/pyproject.toml); the server depends on it.
OUTPUT = ROOT / "clients" / "python" / "budgetwarden_api"
HEADER = '"""Generated from proto/ by `python proto/generate.py`. Do not edit."""\n'
_IMPORT = re.compile(r"^(from|import) budgetwarden\.v1\b", re.MULTILINE)


def _protoc(out_dir: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    bin_dir = Path(sys.executable).parent
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        *protos,
    ]
    subprocess.run(cmd, check=True, cwd=PROTO_ROOT)


def generate(target: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp)
        _protoc(raw)
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(raw / "budgetwarden", target)
    for path in sorted(target.rglob("*")):
        if path.suffix in {".py", ".pyi"}:
            text = _IMPORT.sub(r"\1 budgetwarden_api.v1", path.read_text())
            path.write_text(text)
    for package in [target, *(p for p in target.rglob("*") if p.is_dir())]:
        (package / "__init__.py").write_text(HEADER)
    (target / "py.typed").write_text("")


def _same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    if cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files:
        return False
    return all(_same_tree(a / d, b / d) for d in cmp.common_dirs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    if not args.check:
        generate(OUTPUT)
        print(f"generated {OUTPUT.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "budgetwarden_api"
        generate(fresh)
        if not OUTPUT.exists() or not _same_tree(fresh, OUTPUT):
            print("generated code is stale: run `make proto` and commit the result", file=sys.stderr)
            return 1
    print("generated code is fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
