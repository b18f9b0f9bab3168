"""Resource names: `sessions/{id}` and `sessions/{id}/jobs/{job}`, parsed strictly.

Clients type these in grpcurl, so a malformed name must say exactly what is wrong (INVALID_ARGUMENT
with a field violation) instead of becoming a confusing NOT_FOUND. Ids are positive int64, the
range of the BIGINT primary keys: anything larger could never exist and would overflow the query.
"""

from __future__ import annotations

import re

from imagetraining.errors import InvalidArgument

MAX_ID = 2**63 - 1
_SESSION = re.compile(r"sessions/([0-9]{1,19})")
_JOB = re.compile(r"sessions/([0-9]{1,19})/jobs/([0-9]{1,19})")


def session_name(session_id: int) -> str:
    return f"sessions/{session_id}"


def job_name(session_id: int, job_id: int) -> str:
    return f"sessions/{session_id}/jobs/{job_id}"


def _id(raw: str, field: str, expected: str) -> int:
    value = int(raw)
    if raw.startswith("0") or not 1 <= value <= MAX_ID:
        raise InvalidArgument.field(field, f"expected {expected} with a positive 64-bit id")
    return value


def parse_session_name(name: str, field: str = "name") -> int:
    """The session id of "sessions/{id}"; InvalidArgument (field violation on `field`) otherwise."""
    if name == "":
        raise InvalidArgument.field(field, 'required: a session name like "sessions/19"')
    match = _SESSION.fullmatch(name)
    if match is None:
        raise InvalidArgument.field(field, f'{name[:100]!r} is not a session name like "sessions/19"')
    return _id(match.group(1), field, '"sessions/{id}"')


def parse_job_name(name: str, field: str = "name") -> tuple[int, int]:
    """(session id, job id) of "sessions/{id}/jobs/{job}"; InvalidArgument otherwise."""
    match = _JOB.fullmatch(name)
    if match is None:
        raise InvalidArgument.field(field, f'{name[:100]!r} is not a job name like "sessions/19/jobs/7"')
    expected = '"sessions/{id}/jobs/{job}"'
    return _id(match.group(1), field, expected), _id(match.group(2), field, expected)
