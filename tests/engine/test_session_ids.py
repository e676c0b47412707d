"""Session ids are bearer-like secrets within an owner's reach: the engine mints them from
the OS's CSPRNG with at least 128 bits, so one cannot be guessed from another."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator

import pytest

from sinkserve.engine.engine import Engine
from sinkserve.engine.tokenizer import Tokenizer
from tests.engine.helpers import RecordingEngine, tiny_model

OPENED = 200


@pytest.fixture
def engine(tokenizer: Tokenizer) -> Iterator[Engine]:
    cfg, tensors = tiny_model(tokenizer.vocab_size, seed=3)
    # No store: sessions live in memory only; a generous owner quota for the loop below.
    built = RecordingEngine(tokenizer, tensors, cfg, max_sessions_per_owner=OPENED).engine
    built.start()
    yield built
    built.shutdown()


def test_opened_session_ids_carry_at_least_128_random_bits_and_are_distinct(
    engine: Engine,
) -> None:
    ids = []
    for _ in range(OPENED):
        sid = engine.open_session(owner="alice")
        ids.append(sid)
        engine.end_session(sid, owner="alice")  # a freed id is not handed out again
    assert len(set(ids)) == OPENED
    for sid in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]+", sid), sid  # URL-safe base64, unpadded
        assert len(base64.urlsafe_b64decode(sid + "=" * (-len(sid) % 4))) >= 16, sid
