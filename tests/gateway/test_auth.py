"""Bearer tokens: parsing, comparison, and reloads (unit, in a gateway, in a process)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog

from sinkserve.client import ChatClient, sampling
from sinkserve.config import ConfigError
from sinkserve.gateway.auth import ANONYMOUS, Authenticator, parse_tokens
from tests.gateway.conftest import REPO_ROOT, GatewayFactory, free_port, served, target
from tests.gateway.test_gateway_without_triton import code_of, scrape


def test_token_lines_map_tokens_to_callers_and_skip_comments() -> None:
    text = "# team\nalice: tok-a\n\nbob:tok-b\n"
    assert parse_tokens(text, source="f") == {"tok-a": "alice", "tok-b": "bob"}


@pytest.mark.parametrize("text", ["alice", "alice:", ":tok", "a:t\nb:t"])
def test_malformed_or_duplicate_tokens_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="entry"):
        parse_tokens(text, source="tokens.txt")


def test_a_bearer_token_names_its_caller() -> None:
    auth = Authenticator({"tok-a": "alice"})
    assert auth.caller([("authorization", "Bearer tok-a")]) == "alice"
    assert auth.caller([("authorization", "bearer tok-a")]) == "alice"


@pytest.mark.parametrize(
    "metadata",
    [[], [("authorization", "Bearer nope")], [("authorization", "tok-a")], [("x", "tok-a")]],
)
def test_a_missing_or_wrong_token_names_no_caller(metadata: list[tuple[str, str]]) -> None:
    assert Authenticator({"tok-a": "alice"}).caller(metadata) is None


def test_tokens_come_from_a_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("alice:tok-a\n")
    auth = Authenticator.from_sources(
        disabled=False, tokens_file=str(path), tokens_env="TOK", environ={"TOK": "bob:tok-b"}
    )
    assert auth.caller([("authorization", "Bearer tok-b")]) == "bob"
    assert auth.caller([("authorization", "Bearer tok-a")]) == "alice"


def test_auth_without_tokens_refuses_to_start_unless_explicitly_disabled() -> None:
    with pytest.raises(ConfigError, match="no API tokens"):
        Authenticator.from_sources(disabled=False, tokens_file="", tokens_env="TOK", environ={})
    off = Authenticator.from_sources(disabled=True, tokens_file="", tokens_env="TOK", environ={})
    assert not off.enabled
    assert off.caller([]) == ANONYMOUS


# ---- token comparison -----------------------------------------------------------------


def test_a_token_differing_in_one_character_names_no_caller() -> None:
    token = "s3cret-token-of-alice"
    auth = Authenticator({token: "alice", "another-token": "bob"})
    assert auth.caller([("authorization", f"Bearer {token}")]) == "alice"
    for i, char in enumerate(token):
        near = token[:i] + ("x" if char != "x" else "y") + token[i + 1 :]
        assert auth.caller([("authorization", f"Bearer {near}")]) is None, near
    for near in (token[:-1], token + "a", token.upper()):  # shorter, longer, case
        assert auth.caller([("authorization", f"Bearer {near}")]) is None, near


# ---- reloading the tokens -------------------------------------------------------------


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def replace_file(path: Path, text: str) -> None:
    """Write `text` to `path` as a new file swapped in (as the kubelet updates a Secret)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def file_auth(path: Path, environ: dict[str, str] | None = None) -> Authenticator:
    return Authenticator.from_sources(
        disabled=False, tokens_file=str(path), tokens_env="TOK", environ=environ or {}
    )


def test_reload_reads_the_file_again_and_counts_changes_only(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("alice:tok-a\n")
    auth = file_auth(path)
    assert (auth.generation, auth.file_changed()) == (0, False)
    assert auth.reload() == "unchanged" and auth.generation == 0
    replace_file(path, "# alice left\nbob:tok-b\n")
    assert auth.file_changed()
    assert auth.reload() == "changed"
    assert (auth.generation, auth.file_changed()) == (1, False)
    assert auth.caller(bearer("tok-a")) is None
    assert auth.caller(bearer("tok-b")) == "bob"
    replace_file(path, "bob:tok-b\n")  # a new file, the same tokens
    assert auth.file_changed() and auth.reload() == "unchanged" and auth.generation == 1


def test_reload_rereads_the_environment_source_too(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("alice:tok-a\n")
    environ = {"TOK": "bob:tok-b"}
    auth = file_auth(path, environ)
    environ["TOK"] = "carol:tok-c"
    assert auth.reload() == "changed"
    assert auth.caller(bearer("tok-b")) is None
    assert auth.caller(bearer("tok-c")) == "carol"
    assert auth.caller(bearer("tok-a")) == "alice"


@pytest.mark.parametrize(
    "bad", ["alice\n", "", "# nobody\n", None], ids=["malformed", "empty", "no-token", "gone"]
)
def test_a_bad_or_missing_file_keeps_the_previous_tokens_and_logs_an_error(
    tmp_path: Path, bad: str | None
) -> None:
    path = tmp_path / "tokens"
    path.write_text("alice:tok-a\n")
    auth = file_auth(path)
    if bad is None:
        path.unlink()
    else:
        replace_file(path, bad)
    assert auth.file_changed()
    with structlog.testing.capture_logs() as logs:
        assert auth.reload() == "failed"
    assert auth.caller(bearer("tok-a")) == "alice" and auth.generation == 0
    (entry,) = logs
    assert entry["log_level"] == "error" and "previous tokens stay" in entry["event"]
    # Tried once per change: the next check sees the file it failed on, not a new one.
    assert not auth.file_changed()
    replace_file(path, "alice:tok-a\nbob:tok-b\n")
    assert auth.reload() == "changed" and auth.caller(bearer("tok-b")) == "bob"


def test_reload_with_auth_off_or_given_tokens_changes_nothing() -> None:
    off = Authenticator.from_sources(disabled=True, tokens_file="", tokens_env="", environ={})
    given = Authenticator({"tok-a": "alice"})
    for auth in (off, given):
        assert not auth.file_changed()
        assert auth.reload() == "unchanged" and auth.generation == 0


# ---- reloading in a running gateway ---------------------------------------------------


async def until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Return as soon as `predicate()` holds; fail if it does not within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.01)


async def create_code(client: ChatClient) -> grpc.StatusCode:
    """How CreateSession ends without Triton: UNAVAILABLE once past auth."""
    code, _ = await code_of(client.create_session())
    return code


async def test_a_gateway_reloads_its_tokens_file_when_it_changes(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    path = tmp_path / "tokens"
    path.write_text("alice:alice-token\n")
    auth = file_auth(path)
    gw = await make_gateway(auth=auth, health_interval_s=0.05)
    async with (
        ChatClient(target(gw), "alice-token") as alice,
        ChatClient(target(gw), "dave-token") as dave,
    ):
        assert await create_code(alice) is grpc.StatusCode.UNAVAILABLE
        assert await create_code(dave) is grpc.StatusCode.UNAUTHENTICATED
        replace_file(path, "dave:dave-token\n")
        await until(lambda: auth.generation == 1)
        assert await create_code(alice) is grpc.StatusCode.UNAUTHENTICATED
        assert await create_code(dave) is grpc.StatusCode.UNAVAILABLE
    samples = await asyncio.to_thread(scrape, gw.metrics_port)
    assert samples[("sinkserve_gateway_token_reloads_total", (("result", "changed"),))] == 1


async def test_the_reload_path_of_sighup_applies_a_good_file_and_keeps_tokens_on_a_bad_one(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    path = tmp_path / "tokens"
    path.write_text("alice:alice-token\n")
    auth = file_auth(path)
    # The file watcher waits an hour between checks: only the calls below reload.
    gw = await make_gateway(auth=auth, health_interval_s=3600)
    async with ChatClient(target(gw), "alice-token") as alice:
        replace_file(path, "alice:alice-token\nthis line is no token\n")
        gw.reload_tokens()
        assert await create_code(alice) is grpc.StatusCode.UNAVAILABLE, "still admitted"
        replace_file(path, "dave:dave-token\n")
        gw.reload_tokens()
        assert auth.generation == 1
        assert await create_code(alice) is grpc.StatusCode.UNAUTHENTICATED
    samples = await asyncio.to_thread(scrape, gw.metrics_port)
    reloads = "sinkserve_gateway_token_reloads_total"
    assert samples[(reloads, (("result", "failed"),))] == 1
    assert samples[(reloads, (("result", "changed"),))] == 1


async def stderr_event(proc: asyncio.subprocess.Process, event: str) -> dict[str, Any]:
    """The next JSON log line of `proc` (on its stderr) whose event is `event`."""
    assert proc.stderr is not None
    while line := await asyncio.wait_for(proc.stderr.readline(), 60):
        with contextlib.suppress(json.JSONDecodeError):
            entry: dict[str, Any] = json.loads(line)
            if entry.get("event") == event:
                return entry
    raise AssertionError(f"the process ended its log without {event!r}")


async def test_sighup_makes_a_gateway_process_reload_its_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("alice:alice-token\n")
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sinkserve.cli", "--log-json", "gateway",
        "--port", str(port), "--metrics-port", "-1", "--triton-url", f"127.0.0.1:{free_port()}",
        "--tokens-file", str(path), "--tokens-env", "",
        # No file check within the test (the watcher waits an hour): only SIGHUP reloads.
        "--health-interval-s", "3600", "--drain-delay-s", "0",
        cwd=REPO_ROOT, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await stderr_event(proc, "gateway listening")
        async with (
            ChatClient(f"127.0.0.1:{port}", "alice-token") as alice,
            ChatClient(f"127.0.0.1:{port}", "dave-token") as dave,
        ):
            # Answered by the gateway's event loop, which runs it only once `start()`
            # returned and run_until_signal installed its handlers (no await between).
            assert await create_code(alice) is grpc.StatusCode.UNAVAILABLE
            replace_file(path, "dave:dave-token\n")
            proc.send_signal(signal.SIGHUP)
            reloaded = await stderr_event(proc, "tokens reloaded")
            assert reloaded["generation"] == 1
            assert await create_code(alice) is grpc.StatusCode.UNAUTHENTICATED
            assert await create_code(dave) is grpc.StatusCode.UNAVAILABLE
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_removed_token_refuses_new_calls_while_its_open_stream_finishes(
    make_gateway: GatewayFactory, triton_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "tokens"
    path.write_text("alice:alice-token\nbob:bob-token\n")
    auth = file_auth(path)
    gw = await served(make_gateway, triton_url, auth=auth, health_interval_s=0.05)
    async with ChatClient(target(gw), "alice-token") as alice:
        chat = alice.conversation(defaults=sampling(max_tokens=4))
        await chat.open()
        await chat.turn("Hello!")
        replace_file(path, "bob:bob-token\n")
        await until(lambda: auth.generation == 1)
        code, _ = await code_of(alice.list_sessions())
        assert code is grpc.StatusCode.UNAUTHENTICATED
        code, _ = await code_of(alice.conversation(chat.session_id).open())
        assert code is grpc.StatusCode.UNAUTHENTICATED
        # The stream opened before the reload goes on, and ends normally.
        _, end = await chat.turn("And again.")
        assert end.usage.generated_tokens > 0
        await chat.end()
