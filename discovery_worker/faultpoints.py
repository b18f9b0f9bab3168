"""Crash-test fault points: where a worker can be made to die or freeze on purpose.

`IMAGETRAINING_FAULT_POINT=name[:nth[:kill|stop]]` (tests only; unset in production, where each
point costs one comparison) picks one of FAULT_POINTS; the worker SIGKILLs or SIGSTOPs itself the
n-th time it passes there. Kept apart from the claims they test.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "IMAGETRAINING_FAULT_POINT"
FAULT_POINTS = (
    "after_claim",
    "discovery_batch_before_commit",
    "discovery_batch_after_commit",
    "before_running_transition",
    "training_chunk_before_commit",
    "training_chunk_after_commit",
    "before_completed_transition",
)


def _parse_fault(raw: str | None) -> tuple[str, int, str] | None:
    """ "name[:nth[:kill|stop]]" -> (name, nth, action)."""
    if not raw:
        return None
    name, _, rest = raw.partition(":")
    nth, _, action = rest.partition(":")
    action = action.strip() or "kill"
    if action not in ("kill", "stop"):
        raise ValueError(f"{FAULT_ENV}: action {action!r} is not kill or stop")
    return name.strip(), int(nth) if nth.strip() else 1, action


_fault = _parse_fault(os.environ.get(FAULT_ENV))
_fault_hits = 0


def fault_point(name: str) -> None:
    """At the n-th pass through `name`, when IMAGETRAINING_FAULT_POINT selects it: SIGKILL this process
    (action `kill`, the default), or SIGSTOP it (action `stop`, once).

    A no-op (one comparison) when the variable is unset. Signals, not exceptions: the crash tests want
    a worker that gets no chance to clean up (OOM kill, power loss, kill -9), and the freeze tests one
    that stops answering in the middle of what it was doing (a stalled VM, a partition) while it holds
    whatever it holds, e.g. its session row's lock inside a fenced transaction; a test sends SIGCONT.
    """
    global _fault_hits
    if _fault is None or _fault[0] != name:
        return
    _fault_hits += 1
    if _fault[2] == "stop":
        if _fault_hits == _fault[1]:
            os.kill(os.getpid(), signal.SIGSTOP)
        return
    if _fault_hits >= _fault[1]:
        os.kill(os.getpid(), signal.SIGKILL)
