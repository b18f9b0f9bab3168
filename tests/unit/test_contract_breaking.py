"""`buf breaking` against the committed image of the released contract catches what breaks clients.

`make lint` runs `buf breaking --against protos/released/imagetraining-v1.binpb` (one image per
released package version, written by `make release-contract`), so the check needs no git history.
Here a copy of the module is changed in ways that break existing clients, and buf must refuse each
one with a message naming it; the unchanged copy, and a compatible addition, must pass.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

BUF = Path(sys.executable).parent / "buf"
RELEASED = ROOT / "protos" / "released" / "imagetraining-v1.binpb"
V1 = Path("protos") / "imagetraining" / "v1"

pytestmark = pytest.mark.skipif(not BUF.exists(), reason=f"{BUF} missing: install the dev extra (make venv)")


@pytest.fixture
def module(tmp_path: Path) -> Path:
    """A copy of the buf workspace (buf.yaml and protos/) to change freely."""
    copy = tmp_path / "contract"
    copy.mkdir()
    shutil.copy2(ROOT / "buf.yaml", copy / "buf.yaml")
    shutil.copytree(ROOT / "protos", copy / "protos", ignore=shutil.ignore_patterns("released"))
    return copy


def breaking(module: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUF), "breaking", "--against", str(RELEASED)],
        cwd=module,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def edit(module: Path, file: str, old: str, new: str) -> None:
    path = module / V1 / file
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not exactly once in {file}: update this test's change"
    path.write_text(text.replace(old, new))


def test_the_released_image_is_committed() -> None:
    assert RELEASED.is_file(), f"{RELEASED} missing: run `make release-contract` and commit it"


def test_the_unchanged_contract_passes(module: Path) -> None:
    result = breaking(module)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_a_compatible_addition_passes(module: Path) -> None:
    edit(
        module,
        "resources.proto",
        "  string display_name = 2;\n",
        "  string display_name = 2;\n  // Added after the release: old clients ignore it.\n  string note = 99;\n",
    )
    edit(
        module,
        "training_session_service.proto",
        "message CreateSessionRequest {",
        "message PingRequest {}\nmessage PingResponse {}\n\nmessage CreateSessionRequest {",
    )
    result = breaking(module)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("file", "old", "new", "expected"),
    [
        pytest.param(
            "resources.proto",
            "  string display_name = 2;",
            "  string display_name = 22;",
            'Previously present field "2" with name "display_name" on message "Session" was deleted',
            id="field-renumbered",
        ),
        pytest.param(
            "resources.proto",
            "  string display_name = 2;",
            "  string title = 2;",
            'Field "2" on message "Session" changed name from "display_name" to "title"',
            id="field-renamed",
        ),
        pytest.param(
            "resources.proto",
            "  string root_path = 3;",
            "  bytes root_path = 3;",
            'Field "3" with name "root_path" on message "Session" changed type from "string" to "bytes"',
            id="field-type-changed",
        ),
        pytest.param(
            "training_session_service.proto",
            "rpc StartSession(",
            "rpc BeginSession(",
            'Previously present RPC "StartSession" on service "TrainingSessionService" was deleted',
            id="rpc-renamed",
        ),
    ],
)
def test_a_breaking_change_fails_naming_it(module: Path, file: str, old: str, new: str, expected: str) -> None:
    edit(module, file, old, new)
    result = breaking(module)
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"buf breaking accepted a breaking change ({old!r} -> {new!r}):\n{output}"
    assert expected in output, output
    assert f"{V1 / file}:" in output, output
