"""List pages and filters: opaque page tokens bound to the filter they were issued for."""

from __future__ import annotations

import base64
import binascii
import json

from imagetraining import convert
from imagetraining.errors import InvalidArgument
from imagetraining.states import JobState, SessionState
from imagetraining.v1 import resources_pb2 as pb


def page_size_of(page_size: int, default: int, maximum: int) -> int:
    if page_size < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    return min(page_size or default, maximum)


def encode_token(after_id: int, scope: str) -> str:
    raw = json.dumps({"after": after_id, "scope": scope}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, scope: str) -> int | None:
    """The id a page starts after; InvalidArgument unless this server issued it for `scope`."""
    if not token:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        after = data["after"]
        issued_for = data["scope"]
    except (ValueError, binascii.Error, KeyError, TypeError):
        raise InvalidArgument.field("page_token", "is not a page token issued by this server") from None
    if not isinstance(after, int) or isinstance(after, bool) or after < 0 or not isinstance(issued_for, str):
        raise InvalidArgument.field("page_token", "is not a page token issued by this server")
    if issued_for != scope:
        raise InvalidArgument.field(
            "page_token", "was issued for another filter; repeat the first request with this filter instead"
        )
    return after


def session_state_filter(value: int) -> SessionState | None:
    if value == pb.SESSION_STATE_UNSPECIFIED:
        return None
    if value not in convert.SESSION_STATE_FROM_PROTO:
        raise InvalidArgument.field("state", f"{value} is not a SessionState")
    return convert.SESSION_STATE_FROM_PROTO[value]


def job_state_filter(value: int) -> JobState | None:
    if value == pb.JOB_STATE_UNSPECIFIED:
        return None
    if value not in convert.JOB_STATE_FROM_PROTO:
        raise InvalidArgument.field("state", f"{value} is not a JobState")
    return convert.JOB_STATE_FROM_PROTO[value]
