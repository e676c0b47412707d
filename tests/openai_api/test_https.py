"""With the gateway's TLS settings the HTTP API speaks HTTPS with the same certificate, and
asks for client certificates when the gateway does (no Triton needed: /v1/models)."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
import pytest

from tests.gateway.conftest import GatewayFactory
from tests.gateway.test_tls import make_pki, tls_settings

AUTH = {"Authorization": "Bearer alice-token"}


async def models(port: int, context: ssl.SSLContext | None, scheme: str = "https") -> int:
    async with aiohttp.ClientSession(headers=AUTH) as http:
        url = f"{scheme}://127.0.0.1:{port}/v1/models"
        async with http.get(url, ssl=context if context is not None else False) as reply:
            return reply.status


async def test_the_http_api_speaks_tls_and_asks_for_client_certificates_as_grpc_does(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path)
    trusting = ssl.create_default_context(cafile=str(pki.ca))
    gw = await make_gateway(http_port=0, **tls_settings(pki))
    assert await models(gw.http_port, trusting) == 200
    with pytest.raises(aiohttp.ClientError):
        await models(gw.http_port, None, scheme="http")  # plaintext gets no answer
    mutual = await make_gateway(http_port=0, **tls_settings(pki, client_ca=True))
    with pytest.raises(aiohttp.ClientError):
        await models(mutual.http_port, trusting)  # no client certificate
    trusting.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    assert await models(mutual.http_port, trusting) == 200
