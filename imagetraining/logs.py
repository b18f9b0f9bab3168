"""Log lines a person can follow: the request id of the RPC being served, on every line it causes.

`request_id` is set by imagetraining.rpc for the duration of each call (from the client's
`x-request-id` metadata, or made there); `RequestIdFilter` puts it in the record as ` [<id>]` (empty
outside a request), which the services' log format shows after the logger name.
"""

from __future__ import annotations

import contextvars
import logging

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id.get()
        record.request = f" [{rid}]" if rid else ""
        return True
