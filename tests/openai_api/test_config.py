from __future__ import annotations

from sinkserve.cli import build_parser
from sinkserve.gateway.cli import config_from_args
from sinkserve.serve import gateway_config


def test_serve_listens_for_the_openai_api_on_loopback_8080_and_the_gateway_when_asked() -> None:
    parse = build_parser().parse_args
    serve = gateway_config(parse(["serve"]))
    assert (serve.host, serve.http_port) == ("127.0.0.1", 8080)
    assert gateway_config(parse(["serve", "--http-port", "-1"])).http_port == -1
    assert config_from_args(parse(["gateway"])).http_port == -1  # off
    assert config_from_args(parse(["gateway", "--http-port", "0"])).http_port == 0
