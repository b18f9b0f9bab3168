"""Resource names: strict parsing, INVALID_ARGUMENT with a field violation on anything else."""

from __future__ import annotations

import pytest

from imagetraining.errors import InvalidArgument
from imagetraining.names import MAX_ID, job_name, parse_job_name, parse_session_name, session_name


def test_round_trips() -> None:
    assert session_name(19) == "sessions/19"
    assert parse_session_name("sessions/19") == 19
    assert parse_session_name(f"sessions/{MAX_ID}") == MAX_ID
    assert job_name(19, 7) == "sessions/19/jobs/7"
    assert parse_job_name("sessions/19/jobs/7") == (19, 7)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "sessions/",
        "sessions/0",
        "sessions/007",
        "sessions/-1",
        "sessions/+1",
        "sessions/1.5",
        "sessions/x",
        "sessions/1/",
        "/sessions/1",
        "Sessions/1",
        "session/1",
        "sessions/ 1",
        "sessions/1\n",
        f"sessions/{MAX_ID + 1}",
        "sessions/99999999999999999999",
        "sessions/1/jobs/2",
    ],
)
def test_malformed_session_names(name: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_session_name(name)
    assert [(v.field) for v in info.value.violations] == ["name"]
    assert "sessions/" in info.value.message


def test_the_field_is_named() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_session_name("nope", field="parent")
    assert info.value.violations[0].field == "parent"


@pytest.mark.parametrize("name", ["sessions/1", "sessions/1/jobs/", "sessions/1/jobs/0", "sessions/0/jobs/1", "x"])
def test_malformed_job_names(name: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_job_name(name)
    assert info.value.violations[0].field == "name"
