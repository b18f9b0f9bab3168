"""The states of a session and of a job: one definition for the database, the services and the CLI.

The values are what the `state` columns hold (lower case); `convert` maps them to the protobuf
enums, and `TERMINAL_PROTO` / `ACTIVE_PROTO` there are these sets in protobuf form. Kept apart from
the ORM models so that code that only needs the names (convert, the CLI) does not import SQLAlchemy.
"""

from __future__ import annotations

import enum


class SessionState(enum.StrEnum):
    PENDING = "pending"
    DISCOVERING = "discovering"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


# A session in one of these has ended: no worker will touch it until a client starts it again.
TERMINAL_STATES = frozenset({SessionState.COMPLETED, SessionState.CANCELLED, SessionState.FAILED})
# A session in one of these is a worker's to claim and run.
ACTIVE_STATES = frozenset({SessionState.DISCOVERING, SessionState.RUNNING})


class JobState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
