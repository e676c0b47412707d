"""Three replicas behind HAProxy on loopback, sharing Redis (service/sinkserve/cluster.py): 24
sessions hold 10-turn conversations while one replica is SIGKILLed after turn 3 and
another SIGTERMed after turn 6. Every session completes, no turn is answered twice, and
greedy replies equal those of the same conversations without faults.

Slow (about five minutes on 2 cores): three model loads, then 480 turns."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import pytest

from sinkserve.cluster import Cluster
from sinkserve.failover import answered_once, converse
from tests.faults.stack import model_repository

SESSIONS, TURNS = 24, 10
# A window no conversation fills: without evictions, failover must not change a reply.
CLUSTER_PARAMETERS = {
    "window": "508",
    "max_sessions": "8",
    "max_sessions_per_owner": "64",
    # At the end one replica holds all 24 sessions (8 slots), each rebuilt once or twice.
    "step_token_budget": "256",
    "slot_wait_s": "300",
    # Three engines on two cores: one OpenMP thread each, or they oversubscribe the cores.
    "threads": "1",
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    tokens = root / "tokens"
    tokens.write_text("alice:alice-token\n")
    cluster = Cluster(root, model_repository(root, **CLUSTER_PARAMETERS), tokens)
    try:
        cluster.start(ready_timeout_s=600)
        yield cluster
    finally:
        cluster.stop()
        print(f"cluster logs: {root}")


@pytest.mark.timeout(1500)  # three cold model loads (the first compiles the decode step)
def test_sessions_survive_a_killed_and_a_stopped_replica_with_the_same_greedy_replies(
    cluster: Cluster,
) -> None:
    reference = asyncio.run(converse(cluster.target, "alice-token", sessions=SESSIONS, turns=TURNS))
    assert all(len(turns) == TURNS for turns in reference)
    assert not any(t.retried for turns in reference for t in turns)
    stopped: list[int] = []
    faults = {
        3: lambda: cluster.replicas[0].stop(signal.SIGKILL),
        6: lambda: stopped.append(cluster.replicas[1].stop(signal.SIGTERM)),
    }
    errors: dict[int, str] = {}
    faulty = asyncio.run(
        converse(
            cluster.target,
            "alice-token",
            sessions=SESSIONS,
            turns=TURNS,
            faults=faults,
            errors=errors,
        )
    )
    assert stopped == [0]  # the graceful stop drained and exited cleanly
    assert errors == {}  # no session lost
    assert all(answered_once(turns) for turns in faulty)
    retried = [t for turns in faulty for t in turns if t.retried]
    assert retried, "no turn met a dead replica: the faults did not strike"
    for ref, got in zip(reference, faulty, strict=True):
        assert all(t.evicted_tokens == 0 for t in got)
        assert [t.token_ids for t in got] == [t.token_ids for t in ref]
