"""Log lines a person can follow, or a machine can parse: what call and session each line is about.

Three context variables say what the running code is doing:
- `request_id`: set by imagetraining.rpc for the duration of each call (from the client's
  `x-request-id` metadata, or made there);
- `rpc_method`: the full gRPC method of that call ("/imagetraining.v1.TrainingSessionService/GetSession"),
  set and reset with the request id;
- `session_name`: the session a call or a runner is about ("sessions/19"): set by imagetraining.rpc
  from a request's `name` field, and by the worker's runner (discovery_worker/runner.py) for the
  session it runs.

`RequestIdFilter` copies them into each record: `request` as ` [<id>]` (empty outside a request),
which the text format shows after the logger name, and `request_id`, `rpc_method`, `session_name` for
`JsonFormatter` (IMAGETRAINING_LOG_FORMAT=json), which writes one JSON object per line.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
rpc_method: contextvars.ContextVar[str] = contextvars.ContextVar("rpc_method", default="")
session_name: contextvars.ContextVar[str] = contextvars.ContextVar("session_name", default="")

# The text format of both services (the default, IMAGETRAINING_LOG_FORMAT=text).
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request)s: %(message)s"
LOG_FORMATS = ("text", "json")

# Attributes every LogRecord has, and the ones RequestIdFilter adds: what is left of a record's
# attributes came from a log call's `extra=`.
_RECORD_ATTRIBUTES = frozenset(
    [
        *logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__,
        "message",
        "asctime",
        "taskName",
        "request",
        "request_id",
        "rpc_method",
        "session_name",
    ]
)
# Left raw by json.dumps(ensure_ascii=False), but line breaks to str.splitlines() and some log
# readers (U+0085, U+2028, U+2029), or not encodable as UTF-8 (lone surrogates: os.fsdecode of a
# file name that is not UTF-8). Each becomes its \\uXXXX escape, which every JSON parser reads back.
_UNSAFE = re.compile("[\u0085\u2028\u2029\ud800-\udfff]")


class RequestIdFilter(logging.Filter):
    """Adds the request id, RPC method and session name of the current context to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id.get()
        record.request = f" [{rid}]" if rid else ""
        record.request_id = rid
        record.rpc_method = rpc_method.get()
        record.session_name = session_name.get()
        return True


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _plain(value: Any) -> Any:
    """A value json.dumps writes as strict JSON; anything else as its str()."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return str(value)
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line.

    Keys: `time` (ISO 8601, UTC, milliseconds), `level`, `logger`, `message`; `exception` (the
    traceback) and `stack` when the record has them; `request_id`, `method` and `session` when the
    record was made inside a call or a session's runner; then the keys a log call passed with
    `extra=`, where they do not clash with those above.
    """

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC)
        entry: dict[str, Any] = {
            "time": f"{stamp:%Y-%m-%dT%H:%M:%S}.{stamp.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # From RequestIdFilter when the handler has it, else from the context of the logging call.
        context = {
            "request_id": getattr(record, "request_id", None) or request_id.get(),
            "method": getattr(record, "rpc_method", None) or rpc_method.get(),
            "session": getattr(record, "session_name", None) or session_name.get(),
        }
        entry.update((key, value) for key, value in context.items() if value)
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and key not in entry:
                entry[key] = value
        try:
            text = json.dumps(entry, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError):  # an extra that is not JSON (an object, NaN, a cycle)
            text = json.dumps({key: _plain(value) for key, value in entry.items()}, ensure_ascii=False)
        return _UNSAFE.sub(_escape, text)
