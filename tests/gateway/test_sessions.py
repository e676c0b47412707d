from __future__ import annotations

import grpc
import pytest

from service.gateway.errors import GatewayError
from service.gateway.sessions import CacheUsage, SessionRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def registry(clock: Clock | None = None, **limits: int) -> SessionRegistry:
    settings = {"max_sessions": 10, "max_sessions_per_caller": 3, "max_streams_per_caller": 2}
    settings.update(limits)
    return SessionRegistry(ttl_s=60.0, clock=clock or Clock(), **settings)


def code_of(excinfo: pytest.ExceptionInfo[GatewayError]) -> grpc.StatusCode:
    return excinfo.value.code


def test_session_ids_are_long_random_and_distinct() -> None:
    reg = registry(max_sessions_per_caller=10)
    ids = {reg.create("alice").session_id for _ in range(10)}
    assert len(ids) == 10
    assert all(len(i) >= 24 for i in ids)


def test_a_session_belongs_to_its_creator() -> None:
    reg = registry()
    session = reg.create("alice")
    assert reg.get(session.session_id, "alice") is session
    with pytest.raises(GatewayError) as denied:
        reg.get(session.session_id, "bob")
    assert code_of(denied) is grpc.StatusCode.PERMISSION_DENIED


def test_an_unknown_or_empty_id_is_not_found_or_invalid() -> None:
    reg = registry()
    with pytest.raises(GatewayError) as missing:
        reg.get("nope", "alice")
    assert code_of(missing) is grpc.StatusCode.NOT_FOUND
    with pytest.raises(GatewayError) as empty:
        reg.get("", "alice")
    assert code_of(empty) is grpc.StatusCode.INVALID_ARGUMENT


def test_per_caller_and_global_session_limits_are_resource_exhausted() -> None:
    reg = registry(max_sessions=4)
    for _ in range(3):
        reg.create("alice")
    with pytest.raises(GatewayError) as per_caller:
        reg.create("alice")
    assert code_of(per_caller) is grpc.StatusCode.RESOURCE_EXHAUSTED
    reg.create("bob")
    with pytest.raises(GatewayError) as overall:
        reg.create("carol")
    assert code_of(overall) is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_stream_limit_counts_open_streams_per_caller() -> None:
    reg = registry()
    reg.open_stream("alice")
    reg.open_stream("alice")
    with pytest.raises(GatewayError) as excinfo:
        reg.open_stream("alice")
    assert code_of(excinfo) is grpc.StatusCode.RESOURCE_EXHAUSTED
    reg.close_stream("alice")
    reg.open_stream("alice")
    reg.open_stream("bob")


def test_only_one_turn_runs_per_session() -> None:
    reg = registry()
    session = reg.create("alice")
    reg.begin_turn(session, lambda: None)
    with pytest.raises(GatewayError) as excinfo:
        reg.begin_turn(session, lambda: None)
    assert code_of(excinfo) is grpc.StatusCode.FAILED_PRECONDITION
    reg.end_turn(session, CacheUsage(10, 10, 0), completed=True)
    reg.begin_turn(session, lambda: None)
    assert session.turns == 1 and session.cache.position == 10


def test_a_failed_turn_keeps_the_last_known_cache_state() -> None:
    reg = registry()
    session = reg.create("alice")
    reg.begin_turn(session, lambda: None)
    reg.end_turn(session, CacheUsage(7, 7, 0), completed=True)
    reg.begin_turn(session, lambda: None)
    reg.end_turn(session, None, completed=False)
    assert session.cache.position == 7 and session.turns == 1 and not session.turn_running


def test_idle_sessions_expire_after_the_ttl_but_not_mid_turn() -> None:
    clock = Clock()
    reg = registry(clock)
    idle = reg.create("alice")
    busy = reg.create("alice")
    reg.begin_turn(busy, lambda: None)
    clock.now += 59
    assert reg.expired() == []
    clock.now += 2
    assert reg.expired() == [idle]


def test_listing_shows_only_the_callers_sessions_oldest_first() -> None:
    clock = Clock()
    reg = registry(clock)
    first = reg.create("alice")
    clock.now += 1
    reg.create("bob")
    second = reg.create("alice")
    assert reg.owned_by("alice") == [first, second]
