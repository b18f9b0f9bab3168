"""Settings: every variable parsed from the environment, every bad value refused by name.

The point of validating at start is that a typo stops the process at once with one line naming
the variable, instead of a stack trace minutes later inside a request. So each bad value below
must raise `SettingsError` whose `variable` (and message) is the variable that was wrong.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from imagetraining.formats import DEFAULT_EXTENSIONS
from imagetraining.settings import Settings, SettingsError
from tests.certs import make_certs
from tests.conftest import PYTHON, ROOT


@pytest.fixture
def base(library: Path) -> dict[str, str]:
    """The smallest valid environment: a library root."""
    return {"IMAGETRAINING_LIBRARY_ROOTS": str(library)}


def parse(base: dict[str, str], **env: str) -> Settings:
    return Settings.from_env({**base, **env})


def refused(base: dict[str, str], variable: str, value: str) -> SettingsError:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({**base, variable: value})
    assert info.value.variable == variable
    assert str(info.value).startswith(f"{variable}: ")
    assert "\n" not in str(info.value)
    return info.value


def test_defaults(base: dict[str, str], library: Path) -> None:
    s = parse(base)
    assert s.library_roots == (library,)
    assert s.database_url is None
    assert s.data_dir.is_absolute()
    assert s.control_address == "127.0.0.1:50051"
    assert s.worker_address == "127.0.0.1:50052"
    assert s.worker_advertise_address is None
    assert s.advertised_worker_address == "127.0.0.1:50052"
    assert s.log_level == "INFO"
    assert s.auth_token is None
    assert s.tls_cert_file is None and s.tls_key_file is None and s.tls_ca_file is None
    assert s.trainer == "discovery_worker.trainer:DefaultTrainer"
    assert s.default_extensions == DEFAULT_EXTENSIONS
    s.validate_worker()


def test_blank_values_mean_unset(base: dict[str, str]) -> None:
    s = parse(base, DATABASE_URL="  ", IMAGETRAINING_BATCH_SIZE="", IMAGETRAINING_AUTH_TOKEN="")
    assert s.database_url is None
    assert s.batch_size == 2000
    assert s.auth_token is None


# --- IMAGETRAINING_LIBRARY_ROOTS ---------------------------------------------------------------


def test_library_roots_several_resolved_and_deduplicated(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    link = tmp_path / "link-to-a"
    link.symlink_to(a)
    raw = os.pathsep.join([str(a), str(b), "", str(link), f"  {b}  "])
    s = Settings.from_env({"IMAGETRAINING_LIBRARY_ROOTS": raw})
    assert s.library_roots == (a.resolve(), b.resolve())


@pytest.mark.parametrize("value", [None, "", "   ", os.pathsep])
def test_library_roots_required(value: str | None) -> None:
    env = {} if value is None else {"IMAGETRAINING_LIBRARY_ROOTS": value}
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert info.value.variable == "IMAGETRAINING_LIBRARY_ROOTS"


@pytest.mark.parametrize("value", ["/", "//", "/tmp/..", "/./"])
def test_the_whole_file_system_is_not_a_library_root(base: dict[str, str], value: str) -> None:
    """`/` would let every request walk, count and expose every file of the machine."""
    assert "whole file system" in str(refused(base, "IMAGETRAINING_LIBRARY_ROOTS", value))
    elsewhere = os.pathsep.join([base["IMAGETRAINING_LIBRARY_ROOTS"], value])
    refused(base, "IMAGETRAINING_LIBRARY_ROOTS", elsewhere)


def test_a_root_holding_the_embedded_database_is_refused(tmp_path: Path) -> None:
    """With DATABASE_URL unset the data directory holds PostgreSQL's files: no root may contain it."""
    data = tmp_path / "photos" / "data"
    data.mkdir(parents=True)
    for root in (tmp_path / "photos", data):
        with pytest.raises(SettingsError) as info:
            Settings.from_env({"IMAGETRAINING_LIBRARY_ROOTS": str(root), "IMAGETRAINING_DATA_DIR": str(data)})
        assert info.value.variable == "IMAGETRAINING_LIBRARY_ROOTS"
        assert "IMAGETRAINING_DATA_DIR" in str(info.value) and "embedded PostgreSQL" in str(info.value)
    # With another database the data directory holds no database: the same root is fine.
    s = Settings.from_env(
        {
            "IMAGETRAINING_LIBRARY_ROOTS": str(tmp_path / "photos"),
            "IMAGETRAINING_DATA_DIR": str(data),
            "DATABASE_URL": "postgresql://u@h/db",
        }
    )
    assert s.library_roots == ((tmp_path / "photos").resolve(),)
    # A root inside the data directory (make run's demo library) is fine.
    demo = data / "demo-library"
    demo.mkdir()
    s = Settings.from_env({"IMAGETRAINING_LIBRARY_ROOTS": str(demo), "IMAGETRAINING_DATA_DIR": str(data)})
    assert s.library_roots == (demo.resolve(),)


def test_library_roots_bad(base: dict[str, str], tmp_path: Path) -> None:
    file = tmp_path / "file.txt"
    file.write_text("x")
    assert "absolute" in str(refused(base, "IMAGETRAINING_LIBRARY_ROOTS", "relative/dir"))
    assert "existing directory" in str(refused(base, "IMAGETRAINING_LIBRARY_ROOTS", str(tmp_path / "missing")))
    assert "existing directory" in str(refused(base, "IMAGETRAINING_LIBRARY_ROOTS", str(file)))
    good_then_bad = os.pathsep.join([base["IMAGETRAINING_LIBRARY_ROOTS"], str(tmp_path / "missing")])
    refused(base, "IMAGETRAINING_LIBRARY_ROOTS", good_then_bad)


# --- DATABASE_URL and IMAGETRAINING_DATA_DIR ---------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["postgresql://u@h:5432/db", "postgres://u:p@h/db", "postgresql+asyncpg://u@h/db", "postgresql:///db?host=/tmp"],
)
def test_database_url_good(base: dict[str, str], url: str) -> None:
    assert parse(base, DATABASE_URL=url).database_url == url


@pytest.mark.parametrize("url", ["mysql://u@h/db", "sqlite:///x.db", "localhost:5432", "postgresql:/x"])
def test_database_url_bad(base: dict[str, str], url: str) -> None:
    assert "postgresql://" in str(refused(base, "DATABASE_URL", url))


def test_data_dir(base: dict[str, str], tmp_path: Path) -> None:
    assert parse(base, IMAGETRAINING_DATA_DIR=str(tmp_path / "d")).data_dir == tmp_path / "d"
    refused(base, "IMAGETRAINING_DATA_DIR", "relative/data")


# --- addresses ---------------------------------------------------------------------------------

ADDRESSES = [
    ("IMAGETRAINING_CONTROL_ADDRESS", "control_address"),
    ("IMAGETRAINING_WORKER_ADDRESS", "worker_address"),
    ("IMAGETRAINING_WORKER_ADVERTISE_ADDRESS", "worker_advertise_address"),
]


@pytest.mark.parametrize(("variable", "attr"), ADDRESSES)
@pytest.mark.parametrize("value", ["0.0.0.0:6000", "worker-3.local:50052", "[::1]:50051", "localhost:0"])
def test_address_good(base: dict[str, str], variable: str, attr: str, value: str) -> None:
    assert getattr(parse(base, **{variable: value}), attr) == value


@pytest.mark.parametrize(("variable", "attr"), ADDRESSES)
@pytest.mark.parametrize("value", ["localhost", ":50051", "host:", "host:http", "host:70000", "host:-1"])
def test_address_bad(base: dict[str, str], variable: str, attr: str, value: str) -> None:
    assert "HOST:PORT" in str(refused(base, variable, value))


def test_advertised_address_overrides_listen_address(base: dict[str, str]) -> None:
    s = parse(base, IMAGETRAINING_WORKER_ADDRESS="0.0.0.0:50052", IMAGETRAINING_WORKER_ADVERTISE_ADDRESS="w1:50052")
    assert s.advertised_worker_address == "w1:50052"


# --- choices, numbers, free text ---------------------------------------------------------------


def test_log_level(base: dict[str, str]) -> None:
    assert parse(base, IMAGETRAINING_LOG_LEVEL="debug").log_level == "DEBUG"
    assert parse(base, IMAGETRAINING_LOG_LEVEL="Warning").log_level == "WARNING"
    refused(base, "IMAGETRAINING_LOG_LEVEL", "LOUD")


# variable, attribute, default, a good value, values out of range
INTEGERS: list[tuple[str, str, int, int, list[int]]] = [
    ("IMAGETRAINING_SCAN_MAX_FILES", "scan_max_files", 200_000, 5_000, [0, 10_000_001]),
    ("IMAGETRAINING_BATCH_SIZE", "batch_size", 2000, 100, [99, 10_001]),
    ("IMAGETRAINING_POOL_SIZE", "pool_size", 0, 4, [-1, 257]),
    ("IMAGETRAINING_MAX_ATTEMPTS", "max_attempts", 5, 1, [0, 1001]),
    ("IMAGETRAINING_MAX_SESSIONS_PER_WORKER", "max_sessions_per_worker", 2, 64, [0, 65]),
    ("IMAGETRAINING_MAX_FILE_BYTES", "max_file_bytes", 100 * 1024 * 1024, 1024, [0, (1 << 40) + 1]),
    ("IMAGETRAINING_MAX_IMAGE_PIXELS", "max_image_pixels", 100_000_000, 1_000_000, [0, (1 << 40) + 1]),
    ("IMAGETRAINING_MAX_SUBSCRIBERS", "max_subscribers", 2000, 10, [0, 1_000_001]),
]


@pytest.mark.parametrize(("variable", "attr", "default", "good", "bad"), INTEGERS)
def test_integers(base: dict[str, str], variable: str, attr: str, default: int, good: int, bad: list[int]) -> None:
    assert getattr(parse(base), attr) == default
    assert getattr(parse(base, **{variable: f" {good} "}), attr) == good
    for value in bad:
        assert "is not in" in str(refused(base, variable, str(value)))
    for text in ("ten", "1.5", "1e3"):
        assert "not an integer" in str(refused(base, variable, text))


NUMBERS: list[tuple[str, str, float, float, list[float]]] = [
    ("IMAGETRAINING_SCAN_MAX_SECONDS", "scan_max_seconds", 10.0, 2.5, [0.05, 301.0]),
    ("IMAGETRAINING_LEASE_SECONDS", "lease_seconds", 10.0, 30.0, [0.5, 3601.0]),
    ("IMAGETRAINING_HEARTBEAT_SECONDS", "heartbeat_seconds", 2.0, 0.5, [0.01, 601.0]),
    ("IMAGETRAINING_POLL_SECONDS", "poll_seconds", 2.0, 0.1, [0.01, 601.0]),
    ("IMAGETRAINING_SUBSCRIBER_IDLE_SECONDS", "subscriber_idle_seconds", 30.0, 1.0, [0.01, 3601.0]),
    ("IMAGETRAINING_GRACE_SECONDS", "grace_seconds", 5.0, 0.0, [-1.0, 601.0]),
    ("IMAGETRAINING_DATABASE_WAIT_SECONDS", "database_wait_seconds", 30.0, 0.0, [-1.0, 3601.0]),
]


@pytest.mark.parametrize(("variable", "attr", "default", "good", "bad"), NUMBERS)
def test_numbers(base: dict[str, str], variable: str, attr: str, default: float, good: float, bad: list[float]) -> None:
    assert getattr(parse(base), attr) == default
    assert getattr(parse(base, **{variable: str(good)}), attr) == good
    for value in bad:
        assert "is not in" in str(refused(base, variable, str(value)))
    refused(base, variable, "soon")
    # NaN and infinity compare false with every bound: refused, never silently accepted.
    refused(base, variable, "nan")
    refused(base, variable, "inf")


def test_free_text(base: dict[str, str]) -> None:
    s = parse(base, IMAGETRAINING_WORKER_ID="worker-7", IMAGETRAINING_AUTH_TOKEN="s3cret")
    assert s.worker_id == "worker-7"
    assert s.auth_token == "s3cret"


@pytest.mark.parametrize(
    "token",
    ["Zq9cret\n", "Zq9\ncret", "Zq9cret\r", "Zq9 cret", "Zq9\tcret", "Zq9crét", "Zq9cret\u00a0", "Zq9\x7fcret"],
)
def test_auth_token_that_cannot_travel_as_metadata_is_refused(base: dict[str, str], token: str) -> None:
    """gRPC sends only visible ASCII in a header: anything else failed every client with "Invalid metadata"."""
    err = refused(base, "IMAGETRAINING_AUTH_TOKEN", token)
    assert "visible ASCII" in str(err)
    assert "Zq9" not in str(err), "the message must not repeat the token"
    # Every visible ASCII character is fine.
    visible = "".join(chr(c) for c in range(0x21, 0x7F))
    assert parse(base, IMAGETRAINING_AUTH_TOKEN=visible).auth_token == visible


def test_trainer(base: dict[str, str]) -> None:
    assert parse(base, IMAGETRAINING_TRAINER="my.pkg.mod:Trainer").trainer == "my.pkg.mod:Trainer"
    for bad in ("my.pkg.mod.Trainer", ":Trainer", "my.pkg:"):
        assert "module.path:ClassName" in str(refused(base, "IMAGETRAINING_TRAINER", bad))


def test_heartbeat_must_be_shorter_than_lease(base: dict[str, str]) -> None:
    s = parse(base, IMAGETRAINING_LEASE_SECONDS="5", IMAGETRAINING_HEARTBEAT_SECONDS="5")
    with pytest.raises(SettingsError) as info:
        s.validate_worker()
    assert info.value.variable == "IMAGETRAINING_HEARTBEAT_SECONDS"
    assert "IMAGETRAINING_LEASE_SECONDS" in str(info.value)


# --- TLS ---------------------------------------------------------------------------------------


def test_tls_files(base: dict[str, str], tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "tls", ["localhost"])
    cert, key, ca = certs.cert, certs.key, certs.ca
    s = parse(
        base,
        IMAGETRAINING_TLS_CERT_FILE=str(cert),
        IMAGETRAINING_TLS_KEY_FILE=str(key),
        IMAGETRAINING_TLS_CA_FILE=str(ca),
    )
    assert (s.tls_cert_file, s.tls_key_file, s.tls_ca_file) == (cert, key, ca)
    for variable in ("IMAGETRAINING_TLS_CERT_FILE", "IMAGETRAINING_TLS_KEY_FILE", "IMAGETRAINING_TLS_CA_FILE"):
        assert "readable file" in str(refused(base, variable, str(tmp_path / "missing.pem")))
        refused(base, variable, str(tmp_path))  # a directory is not a file
    # One without the other is a half-configured server: refused, naming what to set.
    for only in ({"IMAGETRAINING_TLS_CERT_FILE": str(cert)}, {"IMAGETRAINING_TLS_KEY_FILE": str(key)}):
        with pytest.raises(SettingsError) as info:
            parse(base, **only)
        assert info.value.variable == "IMAGETRAINING_TLS_CERT_FILE"
        assert "IMAGETRAINING_TLS_KEY_FILE" in str(info.value)


def test_unusable_tls_files_are_named_at_start(base: dict[str, str], tmp_path: Path) -> None:
    """gRPC said only "Failed to bind to address"; the stdlib's ssl loads each file and the variable is named."""
    certs = make_certs(tmp_path / "tls", ["localhost"])
    other = make_certs(tmp_path / "other", ["localhost"])
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    pair = {"IMAGETRAINING_TLS_CERT_FILE": str(certs.cert), "IMAGETRAINING_TLS_KEY_FILE": str(certs.key)}
    cases = [
        ({**pair, "IMAGETRAINING_TLS_CERT_FILE": str(garbage)}, "IMAGETRAINING_TLS_CERT_FILE"),
        ({**pair, "IMAGETRAINING_TLS_CERT_FILE": str(certs.key)}, "IMAGETRAINING_TLS_CERT_FILE"),  # a key, not a cert
        ({**pair, "IMAGETRAINING_TLS_KEY_FILE": str(garbage)}, "IMAGETRAINING_TLS_KEY_FILE"),
        ({**pair, "IMAGETRAINING_TLS_KEY_FILE": str(other.key)}, "IMAGETRAINING_TLS_KEY_FILE"),  # another cert's key
        ({**pair, "IMAGETRAINING_TLS_CA_FILE": str(garbage)}, "IMAGETRAINING_TLS_CA_FILE"),
    ]
    for env, variable in cases:
        with pytest.raises(SettingsError) as info:
            parse(base, **env)
        assert info.value.variable == variable, (env, str(info.value))
        assert "\n" not in str(info.value)
        assert str(info.value).startswith(f"{variable}: ")


# --- the processes ----------------------------------------------------------------------------

SERVICES = [
    pytest.param(
        "control_service",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("control_service.__main__") is None
            if importlib.util.find_spec("control_service")
            else True,
            reason="control_service/__main__.py does not exist yet",
        ),
    ),
    pytest.param(
        "discovery_worker",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("discovery_worker.__main__") is None
            if importlib.util.find_spec("discovery_worker")
            else True,
            reason="discovery_worker/__main__.py does not exist yet",
        ),
    ),
]


@pytest.mark.parametrize("module", SERVICES)
@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("IMAGETRAINING_LIBRARY_ROOTS", None),
        ("DATABASE_URL", "mysql://nope"),
        ("IMAGETRAINING_CONTROL_ADDRESS", "no-port"),
        ("IMAGETRAINING_WORKER_ADDRESS", "no-port"),
    ],
)
def test_process_stops_with_one_line_naming_the_variable(
    module: str, variable: str, value: str | None, library: Path
) -> None:
    env: dict[str, Any] = {k: v for k, v in os.environ.items() if not k.startswith("IMAGETRAINING_")}
    env.pop("DATABASE_URL", None)
    env.update(IMAGETRAINING_LIBRARY_ROOTS=str(library), PYTHONPATH=str(ROOT))
    if value is None:
        env.pop(variable)
    else:
        env[variable] = value
    out = subprocess.run(
        [PYTHON, "-m", module], env=env, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT
    )
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert variable in lines[0]
    assert "Traceback" not in out.stderr
