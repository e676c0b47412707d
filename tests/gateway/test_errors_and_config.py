from __future__ import annotations

import grpc
import pytest

from sinkserve.config import ConfigError
from sinkserve.gateway.config import GatewayConfig
from sinkserve.gateway.errors import from_triton_message


@pytest.mark.parametrize(
    ("message", "code", "detail"),
    [
        ("NOT_FOUND: unknown session 'x'", grpc.StatusCode.NOT_FOUND, "unknown session 'x'"),
        ("INVALID_ARGUMENT: top_p=2 must be in (0, 1]", grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ("RESOURCE_EXHAUSTED: no free slot", grpc.StatusCode.RESOURCE_EXHAUSTED, "no free slot"),
        ("FAILED_PRECONDITION: busy", grpc.StatusCode.FAILED_PRECONDITION, "busy"),
        ("UNAVAILABLE: engine stopped", grpc.StatusCode.UNAVAILABLE, "engine stopped"),
        (
            "Request for unknown model: 'sinkserve' is not found",
            grpc.StatusCode.UNAVAILABLE,
            "model unavailable",
        ),
        ("something odd: happened", grpc.StatusCode.INTERNAL, "something odd"),
    ],
)
def test_in_band_triton_errors_map_to_their_status_code(
    message: str, code: grpc.StatusCode, detail: str
) -> None:
    err = from_triton_message(message)
    assert err.code is code
    assert detail in err.message


def test_the_default_gateway_config_is_valid() -> None:
    GatewayConfig()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", 70000),
        ("triton_url", "nohost"),
        ("health_interval_s", 0),
        ("probe_timeout_s", 0),
        ("max_turn_chars", 0),
        ("http_port", -2),
    ],
)
def test_a_bad_setting_is_a_config_error_naming_it(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        GatewayConfig(**{field: value})  # type: ignore[arg-type]
