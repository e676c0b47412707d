"""The durable session store (service/sinkserve/engine/store.py): records, both backends against
the real thing (an SQLite file, a real redis-server), and the background writer."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from sinkserve.engine.store import (
    RedisStore,
    SessionRecord,
    SessionStore,
    SQLiteStore,
    StoreUnavailable,
    StoreWriter,
    open_store,
)
from sinkserve.redis_server import RedisServer

HOUR = 3600.0


def record(
    session_id: str = "s1",
    *,
    owner: str = "alice",
    version: int = 1,
    created_at: float | None = None,
    expire_at: float | None = None,
) -> SessionRecord:
    now = time.time()  # Redis expires keys by the real clock
    created = now if created_at is None else created_at
    return SessionRecord(
        session_id=session_id,
        owner=owner,
        system_prompt="Tu es un assistant. ✓",
        sampling={"temperature": 0.7, "top_p": 0.9, "stop": ["\n\n"], "seed": None},
        sink_ids=(1, 2, 3, 4),
        window_ids=tuple(range(100, 100 + version)),
        owed_ids=(7,),
        position=20 + version,
        turns=version,
        last_finished_eos=version % 2 == 0,
        created_at=created,
        last_active=now,
        expire_at=now + HOUR if expire_at is None else expire_at,
        version=version,
    )


# --- records ---


def test_a_record_survives_a_json_round_trip() -> None:
    original = record(version=3)
    data = original.to_json()
    assert json.loads(data)["format"] == 1
    assert b'": ' not in data and b'", "' not in data, "compact"
    assert SessionRecord.from_json(data) == original
    assert original.evicted == 20 + 3 - 4 - 3
    no_prompt = dataclasses.replace(original, system_prompt=None, sampling={})
    assert SessionRecord.from_json(no_prompt.to_json()) == no_prompt


def test_a_record_copies_what_it_is_given() -> None:
    sampling: dict[str, Any] = {"temperature": 0.5, "stop": ["a"]}
    ids = [5, 6]
    rec = SessionRecord(
        session_id="s",
        owner="o",
        system_prompt=None,
        sampling=sampling,
        sink_ids=ids,  # type: ignore[arg-type]
        window_ids=(),
        owed_ids=(),
        position=2,
        turns=0,
        last_finished_eos=False,
        created_at=1.0,
        last_active=1.0,
        expire_at=2.0,
        version=0,
    )
    sampling["stop"].append("b")
    ids.append(7)
    assert rec.sampling == {"temperature": 0.5, "stop": ["a"]}
    assert rec.sink_ids == (5, 6)


def _mutated(change: dict[str, object], drop: str | None = None) -> bytes:
    doc = json.loads(record().to_json())
    doc.update(change)
    if drop is not None:
        del doc[drop]
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(b"[1, 2]", id="not-an-object"),
        pytest.param(_mutated({"format": 2}), id="unknown-format"),
        pytest.param(_mutated({"format": True}), id="format-true"),
        pytest.param(_mutated({}, drop="format"), id="no-format"),
        pytest.param(_mutated({}, drop="owner"), id="missing-key"),
        pytest.param(_mutated({"position": "21"}), id="position-string"),
        pytest.param(_mutated({"version": True}), id="version-bool"),
        pytest.param(_mutated({"sink_ids": [1, "2"]}), id="token-string"),
        pytest.param(_mutated({"window_ids": {"a": 1}}), id="ids-object"),
        pytest.param(_mutated({"last_finished_eos": 1}), id="eos-int"),
        pytest.param(_mutated({"sampling": [1]}), id="sampling-list"),
        pytest.param(_mutated({"system_prompt": 3}), id="prompt-int"),
        pytest.param(_mutated({"position": 2}), id="position-below-sinks-and-window"),
        pytest.param(
            record().to_json().replace(b'"expire_at":', b'"expire_at":NaN,"x":'), id="nan"
        ),
    ],
)
def test_a_malformed_record_raises_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        SessionRecord.from_json(data)


# --- both backends ---


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SessionStore]:
    backend: SessionStore
    if request.param == "sqlite":
        backend = SQLiteStore(tmp_path / "sessions.db")
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        backend = RedisStore(server.url)
    yield backend
    backend.close()


def test_a_stored_record_is_read_back(store: SessionStore) -> None:
    rec = record(version=2)
    assert store.put(rec) is True
    assert store.get("s1", time.time()) == rec
    assert store.get("other", time.time()) is None


def test_an_older_version_never_overwrites_a_newer_one(store: SessionStore) -> None:
    assert store.put(record(version=2))
    assert store.put(record(version=1)) is False
    assert store.put(record(version=2)) is False, "an equal version is not newer"
    stored = store.get("s1", time.time())
    assert stored is not None and stored.version == 2
    assert store.put(record(version=3))
    stored = store.get("s1", time.time())
    assert stored is not None and stored.version == 3


def test_a_deleted_record_is_gone(store: SessionStore) -> None:
    store.put(record())
    store.delete("s1")
    store.delete("never-stored")
    assert store.get("s1", time.time()) is None
    assert store.owned_by("alice", time.time()) == []
    assert store.put(record(version=1)), "a delete leaves no tombstone"


def test_owned_by_lists_only_the_owners_records_sorted_by_creation_then_id(
    store: SessionStore,
) -> None:
    store.put(record("b", created_at=2.0))
    store.put(record("a", created_at=2.0))
    store.put(record("c", created_at=1.0))
    store.put(record("d", owner="bob"))
    now = time.time()
    assert [r.session_id for r in store.owned_by("alice", now)] == ["c", "a", "b"]
    assert [r.session_id for r in store.owned_by("bob", now)] == ["d"]
    assert store.owned_by("carol", now) == []


def test_a_session_that_changes_owner_is_listed_only_under_its_new_owner(
    store: SessionStore,
) -> None:
    store.put(record("s", owner="alice", version=1))
    store.put(record("s", owner="bob", version=2))
    now = time.time()
    assert store.owned_by("alice", now) == []
    assert [r.session_id for r in store.owned_by("bob", now)] == ["s"]
    store.delete("s")
    assert store.owned_by("bob", now) == []


def test_expired_records_are_not_returned(store: SessionStore) -> None:
    now = time.time()
    store.put(record("gone", expire_at=now - 1.0))
    store.put(record("live", expire_at=now + HOUR))
    assert store.get("gone", now) is None
    assert [r.session_id for r in store.owned_by("alice", now)] == ["live"]
    later = now + 2 * HOUR
    assert store.get("live", later) is None
    assert store.owned_by("alice", later) == []


# --- SQLite ---


def test_sqlite_records_survive_closing_and_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "sessions.db"
    first = SQLiteStore(path)
    rec = record(version=5)
    first.put(rec)
    first.close()
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o600
    second = SQLiteStore(path)
    try:
        assert second.get("s1", time.time()) == rec
        assert second.put(record(version=4)) is False, "the version check survives too"
    finally:
        second.close()


def test_sqlite_purges_expired_records(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "sessions.db")
    now = time.time()
    store.put(record("gone", expire_at=now - 1.0))
    store.put(record("live", expire_at=now + HOUR))
    assert store.purge_expired(now) == 1
    assert store.purge_expired(now) == 0
    assert store.get("live", now) is not None
    store.close()


def test_sqlite_store_that_cannot_open_its_file_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StoreUnavailable):
        SQLiteStore(tmp_path / "a-file" / "sessions.db")


# --- the writer ---


class GatedStore:
    """A real store whose puts wait at a gate: a test holds the writer mid-write."""

    def __init__(self, inner: SessionStore) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.puts: list[int] = []

    def put(self, rec: SessionRecord) -> bool:
        self.entered.set()
        assert self.gate.wait(10), "the test never opened the gate"
        self.puts.append(rec.version)
        return self.inner.put(rec)

    def get(self, session_id: str, now: float) -> SessionRecord | None:
        return self.inner.get(session_id, now)

    def delete(self, session_id: str) -> None:
        self.inner.delete(session_id)

    def owned_by(self, owner: str, now: float) -> list[SessionRecord]:
        return self.inner.owned_by(owner, now)

    def purge_expired(self, now: float) -> int:
        return self.inner.purge_expired(now)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def sqlite(tmp_path: Path) -> SQLiteStore:
    return SQLiteStore(tmp_path / "sessions.db")


def test_the_writer_writes_the_latest_record_of_a_session(sqlite: SQLiteStore) -> None:
    writer = StoreWriter(sqlite)
    try:
        for version in (1, 2, 3):
            writer.put(record(version=version))
        assert writer.flush(10)
        stored = sqlite.get("s1", time.time())
        assert stored is not None and stored.version == 3
        assert writer.pending == 0 and writer.healthy
    finally:
        writer.close()


def test_a_later_put_replaces_an_unwritten_one(sqlite: SQLiteStore) -> None:
    gated = GatedStore(sqlite)
    writer = StoreWriter(gated)
    try:
        writer.put(record(version=1))
        assert gated.entered.wait(10)  # v1 is being written, held at the gate
        writer.put(record(version=2))
        writer.put(record(version=3))
        assert writer.pending == 1, "one session, one intent"
        assert writer.flush(0.05) is False
        gated.gate.set()
        assert writer.flush(10)
        assert gated.puts == [1, 3], "v2 was replaced before it was written"
        stored = sqlite.get("s1", time.time())
        assert stored is not None and stored.version == 3
        assert writer.records_written == 2
    finally:
        gated.gate.set()
        writer.close()


def test_a_delete_after_a_put_leaves_nothing(sqlite: SQLiteStore) -> None:
    writer = StoreWriter(sqlite)
    try:
        writer.put(record("a"))
        writer.delete("a")
        writer.put(record("b"))
        assert writer.flush(10)
        writer.delete("b")
        assert writer.flush(10)
        assert sqlite.get("a", time.time()) is None
        assert sqlite.get("b", time.time()) is None
    finally:
        writer.close()


def test_the_writer_reads_pending_intents_before_the_store(sqlite: SQLiteStore) -> None:
    sqlite.put(record("x", created_at=1.0))
    sqlite.put(record("z", created_at=3.0))
    gated = GatedStore(sqlite)
    writer = StoreWriter(gated)
    try:
        writer.put(record("y", created_at=2.0, version=1))
        assert gated.entered.wait(10)  # y v1 in flight
        assert sqlite.get("y", time.time()) is None
        got = writer.get("y")
        assert got is not None and got.version == 1
        writer.put(record("y", created_at=2.0, version=2))
        got = writer.get("y")
        assert got is not None and got.version == 2
        writer.delete("z")
        assert writer.get("z") is None
        got = writer.get("x")
        assert got is not None and got.session_id == "x", "read through to the store"
        assert [r.session_id for r in writer.owned_by("alice")] == ["x", "y"]
        gated.gate.set()
        assert writer.flush(10)
        assert [r.session_id for r in sqlite.owned_by("alice", time.time())] == ["x", "y"]
        assert writer.get("y") == sqlite.get("y", time.time())
    finally:
        gated.gate.set()
        writer.close()


class ObservedStore(GatedStore):
    """A real store that counts its failed puts, and whose puts the test can hold: with
    `hold()` a put waits until `release()`, so `held()` says that a write is stuck in the
    store at that moment (one lock keeps the two in step: no race between them)."""

    def __init__(self, inner: SessionStore) -> None:
        super().__init__(inner)
        self._cond = threading.Condition()
        self._open = True
        self._waiting = 0  # puts held right now
        self.failures = 0

    def put(self, rec: SessionRecord) -> bool:
        with self._cond:
            self._waiting += 1
            self._cond.notify_all()
            opened = self._cond.wait_for(lambda: self._open, timeout=60)
            self._waiting -= 1
        assert opened, "the test never released the store"
        try:
            return self.inner.put(rec)
        except StoreUnavailable:
            with self._cond:
                self.failures += 1
                self._cond.notify_all()
            raise

    def hold(self) -> None:
        with self._cond:
            self._open = False

    def release(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def held(self) -> bool:
        with self._cond:
            return not self._open and self._waiting > 0

    def wait_held(self, timeout_s: float = 60) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._open and self._waiting > 0, timeout_s)

    def wait_failures(self, n: int, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.failures >= n, timeout=timeout_s)


def test_the_writer_rides_out_a_redis_outage_and_writes_the_latest_record_after_it(
    redis_server: RedisServer,
) -> None:
    observed = ObservedStore(RedisStore(redis_server.url))
    writer = StoreWriter(observed, retry_min_s=0.05, retry_max_s=0.2)
    try:
        with capture_logs() as logs:
            writer.put(record(version=1))
            assert writer.flush(10) and writer.healthy

            redis_server.stop()
            observed.hold()
            writer.put(record(version=2))
            # put returned while the write it asked for is stuck in the store: put never
            # waits on the store (a put that did could only return after `release`).
            assert observed.wait_held(), "the writer never took v2 to the store"
            observed.release()
            # A second failure means the first was handled and the writer retried.
            assert observed.wait_failures(2, timeout_s=10)
            assert not writer.healthy
            observed.hold()
            assert observed.wait_held(), "the writer stopped retrying"
            writer.put(record(version=3))
            assert observed.held(), "put never waits on the store, even in an outage"
            assert writer.pending == 1
            pending = writer.get("s1")
            assert pending is not None and pending.version == 3
            assert writer.flush(0.01) is False
            observed.release()

            redis_server.start()  # same port, empty: it kept nothing
            assert writer.flush(15)
            assert writer.healthy
        stored = observed.inner.get("s1", time.time())
        assert stored is not None and stored.version == 3
        assert writer.write_errors >= 2
        events = [(e["log_level"], e["event"]) for e in logs]
        assert events.count(("warning", "session store unavailable")) == 1
        assert events.count(("info", "session store available again")) == 1
    finally:
        observed.release()
        writer.close()


def test_the_redis_store_reports_an_unreachable_server_as_unavailable(
    redis_server: RedisServer,
) -> None:
    store = RedisStore(redis_server.url)
    redis_server.stop()
    try:
        for call in (
            lambda: store.put(record()),
            lambda: store.get("s1", time.time()),
            lambda: store.delete("s1"),
            lambda: store.owned_by("alice", time.time()),
        ):
            with pytest.raises(StoreUnavailable):
                call()
    finally:
        store.close()


# --- open_store ---


def test_open_store_parses_sqlite_urls_paths_and_redis_urls(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    by_url = open_store(f"sqlite://{tmp_path}/a.db")
    assert isinstance(by_url, SQLiteStore) and by_url.path == tmp_path / "a.db"
    by_path = open_store(str(tmp_path / "b.db"))
    assert isinstance(by_path, SQLiteStore) and by_path.path == tmp_path / "b.db"
    shared = open_store(redis_server.url)
    assert isinstance(shared, RedisStore)
    rec = record()
    assert shared.put(rec) and shared.get("s1", time.time()) == rec
    for store in (by_url, by_path, shared):
        store.close()


@pytest.mark.parametrize(
    "url", ["", "http://localhost/x", "sqlite://relative.db", "sqlite:///", "memcached://h:1"]
)
def test_open_store_rejects_other_urls_naming_the_accepted_forms(url: str) -> None:
    with pytest.raises(ValueError, match="redis://host:port/db"):
        open_store(url)
