"""imagetraining.transitions: the statements agree with the allowed-transition graph, and share their fragments."""

from __future__ import annotations

import re
from pathlib import Path

from imagetraining import transitions as t
from imagetraining.states import SessionState as S


def _client_edges() -> set[tuple[S, S]]:
    return {(source, target) for tr in t.CLIENT_TRANSITIONS for source in tr.source for target in tr.targets}


def _worker_edges() -> set[tuple[S, S]]:
    return {edge for edges in t.WORKER_CHANGES.values() for edge in edges}


def _allowed_edges() -> set[tuple[S, S]]:
    return {(source, target) for source, targets in t.ALLOWED.items() for target in targets}


def test_every_statement_makes_only_allowed_changes() -> None:
    assert _client_edges() | _worker_edges() <= _allowed_edges()


def test_every_allowed_change_has_a_statement() -> None:
    assert _allowed_edges() <= _client_edges() | _worker_edges()


def test_every_state_has_a_way_out() -> None:
    """No state is a dead end: an ended session can always run again."""
    assert set(t.ALLOWED) == set(S)
    assert all(t.ALLOWED[s] for s in S)


def test_worker_statements_set_the_states_they_claim() -> None:
    for name, edges in t.WORKER_CHANGES.items():
        sql = getattr(t, name).text
        for source, target in edges:
            assert f"'{target.value}'" in sql, (name, target)
            # The statement applies to the source state: named in its guard, or any state (fenced).
            assert f"'{source.value}'" in sql or "WHERE id = :id" in sql, (name, source)


def test_client_transitions_set_their_target_and_announce() -> None:
    for tr in t.CLIENT_TRANSITIONS:
        sql = tr.statement.text
        assert t.ANNOUNCE in sql
        assert "state = ANY(:allowed)" in sql
        for target in tr.targets:
            assert f"'{target.value}'" in sql or "resume_state" in sql, (tr.call, target)
        # The caller's trace context ('' when untraced) goes with every client transition.
        assert "trace_context = :trace_context" in sql
        assert tr.params(7) == {"id": 7, "allowed": [s.value for s in tr.source], "trace_context": ""}


def test_state_changes_announce_and_release_the_worker_once_each() -> None:
    """The shared fragments are written once, and every state change uses them."""
    for name in ("TO_RUNNING", "NO_IMAGES", "FINISH", "FAIL_EXHAUSTED", "PAUSE_OFFLINE"):
        assert t.ANNOUNCE in getattr(t, name).text, name
    for name in ("NO_IMAGES", "FINISH", "FAIL_EXHAUSTED", "PAUSE_OFFLINE", "RELEASE"):
        assert t.DISOWN in getattr(t, name).text, name
    source = Path(t.__file__).read_text(encoding="utf-8")
    assert len(re.findall(r"event_sequence = event_sequence \+ 1", source)) == 2  # ANNOUNCE and MINT_SEQUENCE
    assert len(re.findall(r"owner_id = NULL, owner_address = NULL", source)) == 1  # DISOWN


def test_no_other_module_writes_a_session() -> None:
    """Every UPDATE of training_sessions in the services is in the transitions module."""

    root = Path(t.__file__).resolve().parents[1]
    offenders = []
    for package in ("imagetraining", "control_service", "discovery_worker"):
        for path in (root / package).rglob("*.py"):
            if path.name == "transitions.py" or "migrations" in path.parts:
                continue
            text = path.read_text(encoding="utf-8")
            if re.search(r"UPDATE\s+training_sessions\s+(?:\w+\s+)?SET", text):
                offenders.append(str(path.relative_to(root)))
    assert offenders == []
