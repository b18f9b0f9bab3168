"""Regenerate the committed stubs in imagetraining/v1 from protos/.

Run with `make protos`. `tests/unit/test_generated_stubs.py` regenerates into a temporary
directory and fails when the committed files differ, so a proto change without regeneration
cannot land.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE_DIR = Path("imagetraining") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_dir: Path) -> list[Path]:
    """Generate every proto under protos/ into out_dir; return the files written."""
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *sources,
    ]
    # protoc finds the mypy plugins on PATH: put this interpreter's scripts first.
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for p in (out_dir / PACKAGE_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    target = ROOT / PACKAGE_DIR
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        for old in target.iterdir():
            if old.name.endswith(GENERATED_SUFFIXES):
                old.unlink()
        for f in files:
            shutil.copy2(f, target / f.name)
    print(f"generated {len(files)} files into {target.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
