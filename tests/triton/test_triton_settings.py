from __future__ import annotations

from pathlib import Path

import pytest

from sinkserve.config import ConfigError
from sinkserve.triton_server.settings import parse_parameters


def params(**values: str) -> dict[str, dict[str, str]]:
    return {k: {"string_value": v} for k, v in values.items()}


def test_engine_settings_come_from_the_parameters(tmp_path: Path) -> None:
    s = parse_parameters(params(sinks="4", window="60", handoff_dir=str(tmp_path)), "m")
    assert (s.engine.sinks, s.engine.window) == (4, 60)
    assert s.handoff_dir == tmp_path / "m"


def test_an_unknown_key_fails_naming_it() -> None:
    with pytest.raises(ConfigError, match="windw"):
        parse_parameters(params(windw="60"), "m")


def test_a_bad_value_fails_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="window"):
        parse_parameters(params(window="many"), "m")
    with pytest.raises(ConfigError, match="handoff_timeout_s"):
        parse_parameters(params(handoff_timeout_s="-1"), "m")
    with pytest.raises(ConfigError, match="stream_responses_per_s"):
        parse_parameters(params(stream_responses_per_s="-5"), "m")
    with pytest.raises(ConfigError, match=r"metrics_interval_s.*> 0"):
        parse_parameters(params(metrics_interval_s="0"), "m")


def test_a_zero_response_budget_is_allowed_and_means_a_response_per_token() -> None:
    assert parse_parameters(params(stream_responses_per_s="0"), "m").stream_responses_per_s == 0
    assert parse_parameters(params(), "m").stream_responses_per_s > 0


def test_an_unfilled_template_placeholder_fails_the_load() -> None:
    with pytest.raises(ConfigError, match=r"sinks.*placeholder"):
        parse_parameters(params(sinks="${SINKS}"), "m")


def test_sampling_is_the_models_unless_the_parameters_ask_for_greedy() -> None:
    assert parse_parameters(params(), "m").engine.sampling == "model"
    assert parse_parameters(params(sampling="greedy"), "m").engine.sampling == "greedy"
    with pytest.raises(ConfigError, match=r"sampling='hot'.*model, greedy"):
        parse_parameters(params(sampling="hot"), "m")


def test_an_unset_response_budget_follows_the_device_and_a_set_one_wins() -> None:
    assert parse_parameters(params(), "m").stream_responses_per_s == 200
    gpu = {"device": "cuda", "dtype": "bfloat16"}
    assert parse_parameters(params(**gpu), "m").stream_responses_per_s == 1000
    chosen = params(**gpu, stream_responses_per_s="50")
    assert parse_parameters(chosen, "m").stream_responses_per_s == 50
