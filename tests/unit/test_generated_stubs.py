"""The committed stubs in imagetraining/v1 are exactly what the protos generate.

Clients and both services import the committed files, so a proto edit without `make protos`
would ship a contract that the servers do not speak. This regenerates into a temporary directory
with the same script and compares byte for byte.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT

COMMITTED = ROOT / "imagetraining" / "v1"
HINT = "the committed stubs in imagetraining/v1 are stale: run `make protos` and commit the result"


def _gen_protos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_the_protos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # generate() prepends the interpreter's bin dir to PATH (for the protoc plugins): undo it after.
    monkeypatch.setenv("PATH", os.environ.get("PATH", ""))
    gen = _gen_protos()
    fresh = {p.name: p.read_bytes() for p in gen.generate(tmp_path)}
    committed = {p.name: p.read_bytes() for p in COMMITTED.iterdir() if p.name.endswith(gen.GENERATED_SUFFIXES)}
    assert fresh, "protoc generated nothing"
    assert sorted(fresh) == sorted(committed), f"{HINT} (files differ: {sorted(set(fresh) ^ set(committed))})"
    stale = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not stale, f"{HINT} (content differs: {stale})"
    # Every proto has its messages, gRPC stubs and type hints.
    protos = sorted(p.stem for p in (ROOT / "protos" / "imagetraining" / "v1").glob("*.proto"))
    for stem in protos:
        for suffix in gen.GENERATED_SUFFIXES:
            assert f"{stem}{suffix}" in fresh


def test_mypy_plugins_sit_next_to_the_interpreter() -> None:
    """generate() finds protoc-gen-mypy next to sys.executable; without it the .pyi files vanish."""
    assert Path(sys.executable).parent.joinpath("protoc-gen-mypy").exists()
    assert Path(sys.executable).parent.joinpath("protoc-gen-mypy_grpc").exists()
