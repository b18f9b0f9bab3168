"""Structured logs: IMAGETRAINING_LOG_FORMAT=json writes one JSON object per line (issue #14).

Each record becomes exactly one line that json.loads reads back: whatever the message holds (line
breaks, a file name that is not UTF-8), with the request id, RPC method and session of the context it
was logged in, the traceback of an exception, and the keys a log call passed with `extra=`.
"""

from __future__ import annotations

import contextvars
import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagetraining.logs import JsonFormatter, RequestIdFilter, request_id, rpc_method, session_name
from imagetraining.settings import Settings, SettingsError, configure_logging
from tests.conftest import PYTHON, ROOT, subprocess_env

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
HOSTILE = os.fsdecode(b"bad-\xff\xfe-name\n.jpg")  # lone surrogates: not encodable as UTF-8


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger writing JSON to a buffer through the services' filter, like configure_logging's handler."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    log = logging.getLogger("imagetraining.test_logs")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        yield log, stream
    finally:
        log.removeHandler(handler)
        log.propagate = True


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every line the handler wrote, each one JSON object, each encodable as UTF-8."""
    text = stream.getvalue()
    assert text.endswith("\n")
    text.encode("utf-8")  # strict: no lone surrogate reached the stream
    rows = text.splitlines()  # also splits on U+2028, U+0085, ...: none may be raw
    assert len(rows) == text.count("\n")
    parsed = [json.loads(row) for row in rows]
    assert all(isinstance(row, dict) for row in parsed)
    return parsed


def in_context(fn: Any, *, rid: str = "", method: str = "", session: str = "") -> None:
    """Run `fn` with the context variables set, in a context of its own (nothing leaks into the test)."""

    def run() -> None:
        if rid:
            request_id.set(rid)
        if method:
            rpc_method.set(method)
        if session:
            session_name.set(session)
        fn()

    contextvars.copy_context().run(run)


def test_outside_a_call_the_fixed_keys_only(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = logger
    log.info("worker %s started", "w1")
    (row,) = lines(stream)
    assert set(row) == {"time", "level", "logger", "message"}
    assert TIME.match(row["time"]), row["time"]
    assert row["level"] == "INFO"
    assert row["logger"] == "imagetraining.test_logs"
    assert row["message"] == "worker w1 started"


def test_inside_a_call_the_request_id_method_and_session(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = logger
    method = "/imagetraining.v1.TrainingSessionService/GetSession"
    in_context(lambda: log.warning("slow"), rid="req-42", method=method, session="sessions/19")
    in_context(lambda: log.info("no session"), rid="req-43", method=method)
    in_context(lambda: log.info("a runner"), session="sessions/7")
    first, second, third = lines(stream)
    assert first["request_id"] == "req-42" and first["method"] == method and first["session"] == "sessions/19"
    assert first["level"] == "WARNING"
    assert second["request_id"] == "req-43" and second["method"] == method and "session" not in second
    assert third["session"] == "sessions/7" and "request_id" not in third and "method" not in third


def test_without_the_filter_the_context_of_the_call_is_used() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    out: list[str] = []
    in_context(lambda: out.append(JsonFormatter().format(record)), rid="r1", session="sessions/3")
    row = json.loads(out[0])
    assert row["request_id"] == "r1" and row["session"] == "sessions/3"


def test_an_exception_is_its_traceback_in_one_line(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = logger
    try:
        raise ValueError(f"cannot read {HOSTILE}")
    except ValueError:
        in_context(lambda: log.exception("runner failed"), session="sessions/5")
    (row,) = lines(stream)
    assert row["message"] == "runner failed"
    assert row["exception"].startswith("Traceback (most recent call last):")
    assert "ValueError: cannot read bad-" in row["exception"]
    assert HOSTILE in row["exception"]  # escaped on the line, the same text once parsed
    assert row["session"] == "sessions/5"


def test_hostile_messages_stay_one_valid_line(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = logger
    messages = [
        f"cannot open {HOSTILE}",
        "two\nlines\r\nand a\ttab and a \x00 and \x1b[31m",
        "unicode line breaks \u2028 \u2029 \x85 and \x0b \x0c \x1c",
        'quotes " and backslashes \\ and braces {"a": 1}',
        "é 日本 🙂",
    ]
    for message in messages:
        log.error("%s", message)
    rows = lines(stream)
    assert [row["message"] for row in rows] == messages
    # Non-ASCII text stays readable (ensure_ascii=False); the surrogates are escaped.
    assert "é 日本 🙂" in stream.getvalue()
    assert "\\udcff\\udcfe" in stream.getvalue()


def test_extra_keys_are_added_but_never_replace_the_fixed_ones(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = logger
    method = "/imagetraining.v1.TrainingSessionService/StartSession"

    def call() -> None:
        log.info(
            "done",
            extra={
                "code": "OK",
                "duration_ms": 2.5,
                "path": HOSTILE,
                "level": "spoofed",
                "logger": "spoofed",
                "time": "spoofed",
                "session": "spoofed",
                "method": "spoofed",
                "request_id": "spoofed",
                "path_object": Path("/x"),
                "nan": float("nan"),
            },
        )

    in_context(call, rid="req-1", method=method, session="sessions/1")
    (row,) = lines(stream)
    assert row["code"] == "OK" and row["duration_ms"] == 2.5
    assert row["path"] == HOSTILE
    assert row["level"] == "INFO" and row["logger"] == "imagetraining.test_logs" and TIME.match(row["time"])
    assert row["session"] == "sessions/1" and row["method"] == method and row["request_id"] == "req-1"
    # What JSON cannot hold is written as text, and the line stays strict JSON (no NaN).
    assert row["path_object"] == "/x" and row["nan"] == "nan"


def test_the_text_format_is_unchanged(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = logger
    handler = log.handlers[0]
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s%(request)s: %(message)s"))
    in_context(lambda: log.info("hello"), rid="req-9", session="sessions/2")
    assert stream.getvalue() == "INFO imagetraining.test_logs [req-9]: hello\n"


def test_configure_logging_json_on_the_root_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setenv("IMAGETRAINING_LOG_FORMAT", "JSON")
    root.handlers = []
    try:
        configure_logging("INFO")  # the format from the environment, as the services start
        logging.getLogger("imagetraining.configured").info("one %s", "line")
    finally:
        root.handlers = handlers
        root.setLevel(level)
        logging.getLogger("alembic").setLevel(logging.NOTSET)
        logging.getLogger("pgserver").setLevel(logging.NOTSET)
    (row,) = lines(stream)
    assert row["message"] == "one line" and row["logger"] == "imagetraining.configured"
    with pytest.raises(ValueError, match="xml"):
        configure_logging("INFO", "xml")


# --- the setting -----------------------------------------------------------------------------------


def test_log_format_setting(library: Path) -> None:
    base = {"IMAGETRAINING_LIBRARY_ROOTS": str(library)}
    assert Settings.from_env(base).log_format == "text"
    assert Settings.from_env({**base, "IMAGETRAINING_LOG_FORMAT": "json"}).log_format == "json"
    assert Settings.from_env({**base, "IMAGETRAINING_LOG_FORMAT": " Text "}).log_format == "text"
    with pytest.raises(SettingsError) as info:
        Settings.from_env({**base, "IMAGETRAINING_LOG_FORMAT": "xml"})
    assert info.value.variable == "IMAGETRAINING_LOG_FORMAT"
    assert str(info.value).startswith("IMAGETRAINING_LOG_FORMAT: 'xml' is not one of ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("module", ["control_service", "discovery_worker"])
def test_a_bad_log_format_stops_the_service_with_one_line_naming_it(module: str, library: Path) -> None:
    # Settings are checked before anything else: the database is never dialled.
    env = subprocess_env("postgresql://nobody@127.0.0.1:1/none", library, IMAGETRAINING_LOG_FORMAT="xml")
    done = subprocess.run(
        [PYTHON, "-m", module], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("imagetraining: IMAGETRAINING_LOG_FORMAT: 'xml' is not one of "), done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
