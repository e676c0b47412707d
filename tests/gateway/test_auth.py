from __future__ import annotations

from pathlib import Path

import pytest

from service.config import ConfigError
from service.gateway.auth import ANONYMOUS, Authenticator, parse_tokens


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
