"""What a refused call says to do instead, and how long a write waits for a session's row lock.

Every FAILED_PRECONDITION for a state names a call that works in that state (tested for each state
and call: tests/integration/test_cli.py); the lock wait is bounded by the request's deadline.
"""

from __future__ import annotations

import contextvars
import time

from imagetraining import convert
from imagetraining.errors import Aborted, FailedPrecondition, PreconditionViolation, Unavailable
from imagetraining.names import session_name
from imagetraining.states import ACTIVE_STATES, SessionState
from imagetraining.v1 import resources_pb2 as pb

S = SessionState


def _advice(call: str, state: SessionState) -> str:
    """The call to use instead of `call` in `state`."""
    started = state in ACTIVE_STATES
    if call == "StartSession":
        if state is S.PAUSED:
            return "use ResumeSession to continue it"
        if started:
            return (
                "it is already started; follow it with GetSessionProgress, stop it with PauseSession or CancelSession"
            )
        return "use RestartSession to run it again"
    if call == "PauseSession":
        if state is S.PENDING:
            return "it has not started; StartSession starts it"
        if state is S.PAUSED:
            return "it is already paused; ResumeSession continues it"
        return "it has ended; RestartSession runs it again"
    if call == "ResumeSession":
        if state is S.PENDING:
            return "it has not started; use StartSession"
        if started:
            return "it is not paused; PauseSession pauses it"
        return "it has ended; use RestartSession to run it again"
    if call == "CancelSession":
        return "it has already ended; RestartSession runs it again, DeleteSession removes it"
    if call == "RestartSession":
        if state is S.PENDING:
            return "it has not started; use StartSession"
        if state is S.PAUSED:
            return "it is paused; use ResumeSession to continue it (or CancelSession, then RestartSession)"
        return "it is still running; CancelSession it first, then RestartSession (a paused session cannot restart)"
    if call == "DeleteSession":
        return "cancel it with CancelSession or pause it with PauseSession first"
    # UpdateSession (config) and UpdateSubdirectories.
    return "changes are allowed while PENDING, PAUSED or ended; pause it with PauseSession first"


def wrong_state(call: str, session_id: int, state: str) -> FailedPrecondition:
    """FAILED_PRECONDITION (type STATE) naming the current state and the call to use instead."""
    current = SessionState(state)
    name = session_name(session_id)
    message = f"{call}: session {session_id} is {convert.state_label(current)}; {_advice(call, current)}"
    return FailedPrecondition(
        message,
        [PreconditionViolation("STATE", name, message)],
        metadata={"state": pb.SessionState.Name(convert.SESSION_STATE_TO_PROTO[current])},
    )


def no_selection(session_id: int) -> FailedPrecondition:
    message = f"No subdirectories selected for session {session_id}: select at least one with UpdateSubdirectories"
    return FailedPrecondition(message, [PreconditionViolation("SELECTION", session_name(session_id), message)])


def concurrent_change(session_id: int | None, call: str) -> Aborted:
    subject = "the session" if session_id is None else f"session {session_id}"
    return Aborted(
        f"{call}: {subject} was changed by a concurrent call; retry after GetSession",
        metadata={} if session_id is None else {"session": session_name(session_id)},
    )


# How long a write waits for the session row's lock before answering UNAVAILABLE (retry): a worker
# commits its batches in well under this, and one that froze in the middle of a write is cut off by
# PostgreSQL within its idle-in-transaction timeout (discovery_worker.claims.worker_idle_timeout).
LOCK_WAIT_SECONDS = 5.0
# A request with a deadline waits at most this long before its deadline, so the answer still reaches it.
LOCK_WAIT_MARGIN_SECONDS = 0.3
LOCK_WAIT_MIN_SECONDS = 0.05
# The monotonic deadline of the request being served (set by the servicer; None: no deadline).
request_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("request_deadline", default=None)


def lock_wait_seconds() -> float:
    """How long the current request's statements may wait for a row lock."""
    deadline = request_deadline.get()
    if deadline is None:
        return LOCK_WAIT_SECONDS
    remaining = deadline - time.monotonic() - LOCK_WAIT_MARGIN_SECONDS
    return max(LOCK_WAIT_MIN_SECONDS, min(LOCK_WAIT_SECONDS, remaining))


def session_busy(session_id: int | None, call: str) -> Unavailable:
    """UNAVAILABLE with a retry hint: the row is locked by a write in progress (or a frozen worker's)."""
    subject = "the session" if session_id is None else f"session {session_id}"
    return Unavailable(
        f"{call}: {subject} is locked by a worker's write in progress; retry in a second "
        "(a worker that stopped answering loses its lock within seconds)",
        metadata={} if session_id is None else {"session": session_name(session_id)},
    )
