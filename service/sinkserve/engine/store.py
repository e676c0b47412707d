"""The durable session store: what a process needs to rebuild a session's cache.

A StreamingLLM cache holds the session's first `sinks` tokens and its last `window`
tokens, so any process can rebuild it by prefilling at most sinks + window tokens. A
`SessionRecord` holds exactly that (plus the conversation's bookkeeping), and a
`SessionStore` keeps records across restarts (`SQLiteStore`, one host) or across pods
(`RedisStore`). `StoreWriter` writes them from a thread of its own, so the inference step
loop never waits on disk or network, and rides out an unavailable store by retrying.

Speaks only plain data: no torch, gRPC or Triton here.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import redis
import structlog
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

RECORD_FORMAT = 1


class StoreUnavailable(Exception):
    """The store could not be reached or answered an error."""


@dataclass(frozen=True)
class SessionRecord:
    """The durable state of one session: enough for any process to rebuild its cache by
    prefilling at most sinks + window tokens.

    Invariants, checked on construction (a record that could not be read back must not
    be written): `sink_ids` and `window_ids` are disjoint runs of the tokens fed to the
    cache, so `evicted` (the tokens between them that the cache dropped) is >= 0; the
    times are finite unix seconds; `sampling` is JSON. The constructor copies `sampling`
    (through JSON) and the id sequences (to tuples of int), so a record never aliases the
    caller's mutable state and always serializes."""

    session_id: str
    owner: str
    system_prompt: str | None
    sampling: Mapping[str, Any]  # the session's sampling defaults: field name -> JSON value
    sink_ids: tuple[int, ...]  # the session's first `sinks` tokens
    window_ids: tuple[int, ...]  # the last <= window tokens fed to the cache
    owed_ids: tuple[int, ...]  # conversation tokens the cache has not seen yet
    position: int  # tokens fed to the cache so far (absolute)
    turns: int
    last_finished_eos: bool
    created_at: float  # wall-clock unix seconds
    last_active: float
    expire_at: float
    version: int  # increases with every write of this session
    # Who wrote it ("replica/instance"), and until when that writer's turn holds the
    # session (0: no turn running). Another replica waits for the lease or its end.
    holder: str = ""
    lease_until: float = 0.0

    def __post_init__(self) -> None:
        sampling = json.loads(json.dumps(dict(self.sampling), allow_nan=False))
        object.__setattr__(self, "sampling", sampling)
        for name in ("sink_ids", "window_ids", "owed_ids"):
            object.__setattr__(self, name, tuple(map(int, getattr(self, name))))
        for name in ("created_at", "last_active", "expire_at"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"session record {name} must be finite")
        if self.evicted < 0:
            raise ValueError(
                f"session record position {self.position} is less than its "
                f"{len(self.sink_ids)} sink and {len(self.window_ids)} window tokens"
            )
        if self.version < 0 or self.turns < 0:
            raise ValueError("session record version and turns must be >= 0")

    @property
    def evicted(self) -> int:
        """Tokens fed to the cache and dropped from it (between the sinks and the window)."""
        return self.position - len(self.sink_ids) - len(self.window_ids)

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON with a "format" key, read back by `from_json`."""
        doc = {
            "format": RECORD_FORMAT,
            "session_id": self.session_id,
            "owner": self.owner,
            "system_prompt": self.system_prompt,
            "sampling": self.sampling,
            "sink_ids": self.sink_ids,
            "window_ids": self.window_ids,
            "owed_ids": self.owed_ids,
            "position": self.position,
            "turns": self.turns,
            "last_finished_eos": self.last_finished_eos,
            "created_at": self.created_at,
            "last_active": self.last_active,
            "expire_at": self.expire_at,
            "version": self.version,
            "holder": self.holder,
            "lease_until": self.lease_until,
        }
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> SessionRecord:
        """The record `to_json` wrote. Raises ValueError on anything else: not JSON, an
        unknown format, a missing key or a value of the wrong type. Unknown keys are
        ignored (a later writer of the same format may add some)."""
        try:
            doc = json.loads(data, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"session record is not JSON: {err}") from err
        if not isinstance(doc, dict):
            raise ValueError("session record is not a JSON object")
        if type(doc.get("format")) is not int or doc["format"] != RECORD_FORMAT:
            raise ValueError(f"session record has unknown format {doc.get('format')!r}")
        prompt = _field(doc, "system_prompt", (str, type(None)))
        return cls(
            session_id=_field(doc, "session_id", str),
            owner=_field(doc, "owner", str),
            system_prompt=prompt,
            sampling=_field(doc, "sampling", dict),
            sink_ids=_ids(doc, "sink_ids"),
            window_ids=_ids(doc, "window_ids"),
            owed_ids=_ids(doc, "owed_ids"),
            position=_int(doc, "position"),
            turns=_int(doc, "turns"),
            last_finished_eos=_field(doc, "last_finished_eos", bool),
            created_at=_float(doc, "created_at"),
            last_active=_float(doc, "last_active"),
            expire_at=_float(doc, "expire_at"),
            version=_int(doc, "version"),
            holder=_field(doc, "holder", str) if "holder" in doc else "",
            lease_until=_float(doc, "lease_until") if "lease_until" in doc else 0.0,
        )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"session record holds {name}")


def _field(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in doc:
        raise ValueError(f"session record lacks {key!r}")
    value = doc[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"session record {key!r} has the wrong type: {value!r:.80}")
    return value


def _int(doc: Mapping[str, Any], key: str) -> int:
    return cast(int, _field(doc, key, int))


def _float(doc: Mapping[str, Any], key: str) -> float:
    return float(_field(doc, key, (int, float)))


def _ids(doc: Mapping[str, Any], key: str) -> tuple[int, ...]:
    value = _field(doc, key, list)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ValueError(f"session record {key!r} holds a non-integer token id")
    return tuple(value)


class SessionStore(Protocol):
    """Durable session records, keyed by session id. Every method may raise
    StoreUnavailable; none raises anything else for a reachable, healthy store.

    `put` never replaces a record with one of a lower or equal version, so two writers
    (or one writer's retries) cannot roll a session back. A delete leaves no tombstone:
    a later put of any version writes again."""

    def put(self, record: SessionRecord) -> bool:
        """Write unless a record of that session with version >= record.version is
        stored; returns whether it wrote."""
        ...

    def get(self, session_id: str, now: float) -> SessionRecord | None:
        """The session's record; None when absent or expired (expire_at <= now)."""
        ...

    def delete(self, session_id: str) -> None: ...

    def owned_by(self, owner: str, now: float) -> list[SessionRecord]:
        """The owner's unexpired records, sorted by (created_at, session_id)."""
        ...

    def purge_expired(self, now: float) -> int:
        """Drop records with expire_at <= now; returns how many were dropped."""
        ...

    def close(self) -> None: ...


def _decode(raw: bytes, session_id: str) -> SessionRecord | None:
    """A stored record, or None (logged) when it cannot be read: one unreadable record
    must not make every other session unreachable."""
    try:
        return SessionRecord.from_json(raw)
    except ValueError as err:
        structlog.get_logger("sinkserve.store").warning(
            "unreadable session record skipped", session_id=session_id, error=str(err)
        )
        return None


def _sort_key(record: SessionRecord) -> tuple[float, str]:
    return (record.created_at, record.session_id)


class SQLiteStore:
    """A `SessionStore` in one SQLite file, for one host (and a restart of its process).

    One connection shared by the writer thread and request threads (hence
    `check_same_thread=False` and a lock); autocommit, so every statement is its own
    transaction and the version check is a single atomic upsert. WAL with
    synchronous=NORMAL: a committed write survives a process crash; a power loss may
    lose the last writes, but never corrupts the file. The file is created 0600 in a
    0700 directory: records hold the users' conversations."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.path.exists():
                os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            self._db = sqlite3.connect(
                self.path, timeout=5.0, isolation_level=None, check_same_thread=False
            )
        except (sqlite3.Error, OSError) as err:
            raise StoreUnavailable(f"sqlite store {self.path}: {err}") from err
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS sessions (session_id TEXT PRIMARY KEY, owner TEXT,"
                " version INTEGER, expire_at REAL, created_at REAL, record BLOB)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS sessions_owner ON sessions(owner)")
        except (sqlite3.Error, OSError) as err:
            self._db.close()
            raise StoreUnavailable(f"sqlite store {self.path}: {err}") from err

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except (sqlite3.Error, OSError) as err:
                raise StoreUnavailable(f"sqlite store {self.path}: {err}") from err

    def put(self, record: SessionRecord) -> bool:
        row = (
            record.session_id,
            record.owner,
            record.version,
            record.expire_at,
            record.created_at,
            record.to_json(),
        )
        with self._locked() as db:
            cursor = db.execute(
                "INSERT INTO sessions (session_id, owner, version, expire_at, created_at, record)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(session_id) DO UPDATE SET"
                " owner = excluded.owner, version = excluded.version,"
                " expire_at = excluded.expire_at, created_at = excluded.created_at,"
                " record = excluded.record WHERE excluded.version > sessions.version",
                row,
            )
            return cursor.rowcount == 1

    def get(self, session_id: str, now: float) -> SessionRecord | None:
        with self._locked() as db:
            row = db.execute(
                "SELECT record FROM sessions WHERE session_id = ? AND expire_at > ?",
                (session_id, now),
            ).fetchone()
        return None if row is None else _decode(row[0], session_id)

    def delete(self, session_id: str) -> None:
        with self._locked() as db:
            db.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))

    def owned_by(self, owner: str, now: float) -> list[SessionRecord]:
        with self._locked() as db:
            rows = db.execute(
                "SELECT session_id, record FROM sessions WHERE owner = ? AND expire_at > ?"
                " ORDER BY created_at, session_id",
                (owner, now),
            ).fetchall()
        records = (_decode(raw, session_id) for session_id, raw in rows)
        return [r for r in records if r is not None]

    def purge_expired(self, now: float) -> int:
        with self._locked() as db:
            return db.execute("DELETE FROM sessions WHERE expire_at <= ?", (now,)).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()


# KEYS: session hash, owner set. ARGV: version, owner, record, expire_at (unix ms), id.
# The owner set's TTL is kept at the latest expire_at of its members (never shortened),
# so a set outlives every live member and vanishes once all have expired.
_PUT_SCRIPT = """
local stored = redis.call('HGET', KEYS[1], 'v')
if stored and tonumber(stored) >= tonumber(ARGV[1]) then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expire = tonumber(ARGV[4])
if expire <= now then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[5])
  return 1
end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'o', ARGV[2], 'r', ARGV[3])
redis.call('PEXPIREAT', KEYS[1], expire)
redis.call('SADD', KEYS[2], ARGV[5])
local left = redis.call('PTTL', KEYS[2])
if left < 0 or now + left < expire then
  redis.call('PEXPIREAT', KEYS[2], expire)
end
return 1
"""

# KEYS: owner set, then one session hash per ARGV id after the owner (ARGV[1]). Removes
# the ids whose session is gone or now belongs to another owner; atomic, so a put that
# re-adds an id meanwhile is never undone.
_PRUNE_SCRIPT = """
local removed = 0
for i = 2, #KEYS do
  if redis.call('HGET', KEYS[i], 'o') ~= ARGV[1] then
    removed = removed + redis.call('SREM', KEYS[1], ARGV[i])
  end
end
return removed
"""


class RedisStore:
    """A `SessionStore` in Redis, shared by every pod that can reach it.

    `{prefix}session:{id}` is a hash: `v` the version, `o` the owner, `r` the record's
    JSON; its TTL follows expire_at (PEXPIREAT), so Redis drops expired sessions itself.
    `{prefix}owner:{owner}` is a set of the owner's session ids: members whose session is
    gone are removed when the owner's sessions are listed. The version check and the
    write are one Lua script, so concurrent writers cannot interleave between them.

    Short socket timeouts and no retries of the client's own: the caller (`StoreWriter`)
    retries with backoff, and a request thread reading through must fail fast rather
    than hang. Nothing contacts the server until the first call."""

    def __init__(self, url: str, prefix: str = "sinkserve:") -> None:
        self.url = url
        self.prefix = prefix
        self._redis = redis.Redis.from_url(
            url,
            socket_connect_timeout=1.0,
            socket_timeout=2.0,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
        )
        self._put = self._redis.register_script(_PUT_SCRIPT)
        self._prune = self._redis.register_script(_PRUNE_SCRIPT)

    def _session_key(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def _owner_key(self, owner: str) -> str:
        return f"{self.prefix}owner:{owner}"

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (RedisError, OSError) as err:
            raise StoreUnavailable(f"redis store: {type(err).__name__}: {err}") from err

    def put(self, record: SessionRecord) -> bool:
        keys = [self._session_key(record.session_id), self._owner_key(record.owner)]
        expire_ms = math.ceil(record.expire_at * 1000)  # never before expire_at
        args: list[str | int | bytes] = [
            record.version,
            record.owner,
            record.to_json(),
            expire_ms,
            record.session_id,
        ]
        with self._errors():
            return bool(self._put(keys=keys, args=args))

    def get(self, session_id: str, now: float) -> SessionRecord | None:
        with self._errors():
            raw = cast("bytes | None", self._redis.hget(self._session_key(session_id), "r"))
        if raw is None:
            return None
        record = _decode(raw, session_id)
        return record if record is not None and record.expire_at > now else None

    def delete(self, session_id: str) -> None:
        key = self._session_key(session_id)
        with self._errors():
            owner = cast("bytes | None", self._redis.hget(key, "o"))
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(key)
            if owner is not None:
                pipe.srem(self._owner_key(owner.decode()), session_id)
            pipe.execute()

    def owned_by(self, owner: str, now: float) -> list[SessionRecord]:
        owner_key = self._owner_key(owner)
        with self._errors():
            members = cast("set[bytes]", self._redis.smembers(owner_key))
            ids = sorted(m.decode() for m in members)
            if not ids:
                return []
            pipe = self._redis.pipeline(transaction=False)
            for session_id in ids:
                pipe.hmget(self._session_key(session_id), ["o", "r"])
            rows = cast("list[list[bytes | None]]", pipe.execute())
        records: list[SessionRecord] = []
        gone: list[str] = []
        for session_id, (stored_owner, raw) in zip(ids, rows, strict=True):
            if raw is None or stored_owner != owner.encode():
                gone.append(session_id)
                continue
            record = _decode(raw, session_id)
            if record is not None and record.expire_at > now:
                records.append(record)
        if gone:  # housekeeping: the listing stands whether or not this succeeds
            try:
                self._prune(keys=[owner_key, *map(self._session_key, gone)], args=[owner, *gone])
            except (RedisError, OSError) as err:
                structlog.get_logger("sinkserve.store").debug(
                    "owner set not pruned", owner=owner, error=str(err)
                )
        return sorted(records, key=_sort_key)

    def purge_expired(self, now: float) -> int:
        """Nothing to do: Redis drops expired sessions (and emptied owner sets) itself."""
        return 0

    def close(self) -> None:
        self._redis.close()


class GuardedStore:
    """A store that writes only while `may_write()` holds: a process that has lost the
    right to advance its sessions (a model instance orphaned by a dead tritonserver,
    whose turns a successor continues from the store) must not write an older state
    over the one the successor builds on. Reads pass through."""

    def __init__(self, store: SessionStore, may_write: Callable[[], bool]) -> None:
        self._store = store
        self._may_write = may_write

    def _check(self) -> None:
        if not self._may_write():
            raise StoreUnavailable("this process may no longer write session records")

    def put(self, record: SessionRecord) -> bool:
        self._check()
        return self._store.put(record)

    def get(self, session_id: str, now: float) -> SessionRecord | None:
        return self._store.get(session_id, now)

    def delete(self, session_id: str) -> None:
        self._check()
        self._store.delete(session_id)

    def owned_by(self, owner: str, now: float) -> list[SessionRecord]:
        return self._store.owned_by(owner, now)

    def purge_expired(self, now: float) -> int:
        self._check()
        return self._store.purge_expired(now)

    def close(self) -> None:
        self._store.close()


def open_store(url: str) -> SessionStore:
    """The store a URL names: `sqlite:///absolute/path.db` or a plain file path (SQLite),
    or `redis://host:port/db` (`rediss://` for TLS). Raises ValueError on anything else."""
    forms = "sqlite:///absolute/path.db, a file path, or redis://host:port/db"
    if url.startswith(("redis://", "rediss://")):
        return RedisStore(url)
    if url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://")
        if not path.startswith("/") or path.endswith("/"):
            raise ValueError(f"session store {url!r} needs an absolute file path: {forms}")
        return SQLiteStore(Path(path))
    if url and "://" not in url and not url.endswith("/"):
        return SQLiteStore(Path(url).expanduser())
    raise ValueError(f"unsupported session store {url!r}: use {forms}")


class StoreWriter:
    """Writes session records to a `SessionStore` from a daemon thread of its own, so the
    caller (the inference step loop) never waits on I/O.

    `put` and `delete` only record the intent in a dict keyed by session id, under a
    lock: the latest intent of a session replaces an unwritten earlier one (a record is
    a whole snapshot, so only the newest matters), which bounds the dict by the number
    of sessions however long the store is away. They never block on I/O and never raise.

    The thread writes what is pending in batches. When the store is unavailable it puts
    back what it could not write (unless a newer intent arrived meanwhile), reports the
    outage once (a warning when it starts, an info when it ends), and retries with
    exponential backoff from `retry_min_s` to `retry_max_s`. Every `purge_every_s` it
    asks the store to drop expired records.

    Reads (`get`, `owned_by`) see pending intents first, then read through to the
    store: a session written a moment ago reads back before it reaches the store."""

    def __init__(
        self,
        store: SessionStore,
        *,
        retry_min_s: float = 0.2,
        retry_max_s: float = 5.0,
        purge_every_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        on_refused: Callable[[SessionRecord], None] | None = None,
    ) -> None:
        if not 0 < retry_min_s <= retry_max_s:
            raise ValueError("need 0 < retry_min_s <= retry_max_s")
        self.store = store
        # Called from the writer's thread with each record the store refused because it
        # holds a newer version of that session (written by another replica, or by a
        # synchronous claim of the caller's own).
        self.on_refused = on_refused
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self._purge_every_s = purge_every_s
        self._clock = clock
        self._log = structlog.get_logger("sinkserve.store")
        self._cond = threading.Condition()
        # session id -> the record to put, or None to delete it
        self._pending: dict[str, SessionRecord | None] = {}
        self._inflight: dict[str, SessionRecord | None] = {}  # the batch being written
        self._stopping = False
        self._closed = False
        self._healthy = True
        self._write_errors = 0
        self._records_written = 0
        self._written_in_outage = 0
        self._thread = threading.Thread(
            target=self._run, name="sinkserve-store-writer", daemon=True
        )
        self._thread.start()

    # --- the caller's side: intents, never I/O ---

    def put(self, record: SessionRecord) -> None:
        self._intend(record.session_id, record)

    def delete(self, session_id: str) -> None:
        self._intend(session_id, None)

    def _intend(self, session_id: str, record: SessionRecord | None) -> None:
        with self._cond:
            if self._stopping:
                closed = True
            else:
                closed = False
                self._pending[session_id] = record
                self._cond.notify_all()
        if closed:
            self._log.warning("session store writer is closed; not written", session_id=session_id)

    def get(self, session_id: str) -> SessionRecord | None:
        """The pending record of the session if one is queued (None if a delete is),
        else the store's. May raise StoreUnavailable (reading through)."""
        now = self._clock()
        with self._cond:
            for queue in (self._pending, self._inflight):
                if session_id in queue:
                    record = queue[session_id]
                    return record if record is not None and record.expire_at > now else None
        return self.store.get(session_id, now)

    def owned_by(self, owner: str) -> list[SessionRecord]:
        """The owner's unexpired sessions as they will be once pending intents are written,
        sorted by (created_at, session_id). May raise StoreUnavailable."""
        now = self._clock()
        with self._cond:  # before reading the store: an intent written meanwhile stays seen
            intents = {**self._inflight, **self._pending}
        found = {r.session_id: r for r in self.store.owned_by(owner, now)}
        for session_id, record in intents.items():
            stored = found.get(session_id)
            if record is not None and stored is not None and stored.version >= record.version:
                continue  # the store would refuse this put
            found.pop(session_id, None)
            if record is not None and record.owner == owner and record.expire_at > now:
                found[session_id] = record
        return sorted(found.values(), key=_sort_key)

    def flush(self, timeout_s: float) -> bool:
        """Wait until nothing is pending (True) or `timeout_s` passed (False)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._pending and not self._inflight, timeout=timeout_s
            )

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush (for at most `timeout_s`), stop the thread and close the store. Intents
        still unwritten then are lost (logged)."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout_s
        self.flush(timeout_s)
        with self._cond:
            self._stopping = True
            lost = len(self._pending.keys() | self._inflight.keys())
            self._cond.notify_all()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if lost:
            self._log.warning("session store writer closed with unwritten records", records=lost)
        try:
            self.store.close()
        except Exception as err:
            self._log.warning("session store close failed", error=str(err))

    # --- stats ---

    @property
    def healthy(self) -> bool:
        """False from a failed write until a batch is written in full."""
        return self._healthy

    def has_pending(self, session_id: str) -> bool:
        """Whether a put or delete of the session is waiting to be written."""
        with self._cond:
            return session_id in self._pending or session_id in self._inflight

    @property
    def pending(self) -> int:
        """Sessions with an intent not yet written (including the batch being written)."""
        with self._cond:
            return len(self._pending.keys() | self._inflight.keys())

    @property
    def write_errors(self) -> int:
        """Write attempts that failed with StoreUnavailable (one per failed batch)."""
        return self._write_errors

    @property
    def records_written(self) -> int:
        """Puts and deletes the store carried out (a put it refused as older counts too)."""
        return self._records_written

    # --- the thread ---

    def _run(self) -> None:
        backoff = self._retry_min_s
        next_purge = time.monotonic()  # once at start: leftovers of an earlier process
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    wait_s = next_purge - time.monotonic()
                    if wait_s <= 0:
                        break
                    self._cond.wait(wait_s)
                if self._stopping:
                    return
                batch, self._pending = self._pending, {}
                self._inflight = batch
            if batch and not self._write(batch):
                with self._cond:
                    self._cond.wait_for(lambda: self._stopping, timeout=backoff)
                backoff = min(backoff * 2, self._retry_max_s)
                continue
            backoff = self._retry_min_s
            if time.monotonic() >= next_purge:
                self._purge()
                next_purge = time.monotonic() + self._purge_every_s

    def _write(self, batch: dict[str, SessionRecord | None]) -> bool:
        """Write a batch; returns False when the store was unavailable. On the first
        failure the rest is put back untried: the next attempt comes after a backoff."""
        items = list(batch.items())
        written = 0
        failed: list[tuple[str, SessionRecord | None]] = []
        refused: list[SessionRecord] = []  # a newer version was stored by another writer
        error: StoreUnavailable | None = None
        for i, (session_id, record) in enumerate(items):
            try:
                if record is None:
                    self.store.delete(session_id)
                elif not self.store.put(record) and self.on_refused is not None:
                    refused.append(record)
            except StoreUnavailable as err:
                error, failed = err, items[i:]
                break
            except Exception as err:  # a bug, not an outage: retrying would never end
                self._log.error("session record dropped", session_id=session_id, error=repr(err))
                continue
            written += 1
        with self._cond:
            self._inflight = {}
            for session_id, record in failed:
                self._pending.setdefault(session_id, record)  # unless newer arrived
            self._records_written += written
            went_down = came_back = False
            if error is not None:
                self._write_errors += 1
                went_down, self._healthy = self._healthy, False
                self._written_in_outage = 0 if went_down else self._written_in_outage + written
            elif not self._healthy:
                came_back, self._healthy = True, True
            recovered = self._written_in_outage + written
            self._cond.notify_all()
        for record in refused:
            assert self.on_refused is not None
            self.on_refused(record)
        if went_down:
            self._log.warning("session store unavailable", error=str(error))
        if came_back:
            self._log.info("session store available again", records_written=recovered)
        return error is None

    def _purge(self) -> None:
        try:
            purged = self.store.purge_expired(self._clock())
        except StoreUnavailable as err:
            self._log.debug("session purge skipped", error=str(err))
            return
        except Exception as err:
            self._log.error("session purge failed", error=repr(err))
            return
        if purged:
            self._log.info("expired sessions purged", sessions=purged)
