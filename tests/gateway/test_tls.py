"""TLS on the gateway, over real sockets: a certificate authority, a server certificate
(SAN 127.0.0.1 and localhost) and a client certificate made here with `cryptography`.

The gateways have no Triton behind them: a call that passes the handshake and the token
check reaches the servicer, which answers UNAVAILABLE naming Triton; a call stopped at
the handshake fails UNAVAILABLE without reaching it, and one stopped by auth fails
UNAUTHENTICATED.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sinkserve.chat import _chat
from sinkserve.cli import build_parser
from sinkserve.client import ChatClient, SyncChatClient, TLSConfig
from sinkserve.config import ConfigError
from sinkserve.gateway.cli import config_from_args
from sinkserve.gateway.config import GatewayConfig
from sinkserve.serve import gateway_config
from tests.gateway.conftest import GatewayFactory, target
from tests.gateway.test_chat_cli import chat_args


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server and a client certificate it signed, and a second CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # signed neither certificate


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    extensions: list[x509.ExtensionType],
) -> x509.Certificate:
    """A certificate of `key` for `subject`, signed by `issuer` (None: self-signed CA)."""
    now = datetime.datetime.now(datetime.timezone.utc)  # datetime.UTC is new in 3.11
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    def ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        constraints = x509.BasicConstraints(ca=True, path_length=0)
        return _certificate(name, key, None, [constraints]), key

    def leaf(
        name: str,
        signer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
        *extra: x509.ExtensionType,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        extensions = [x509.BasicConstraints(ca=False, path_length=None), *extra]
        return _certificate(name, key, (signer[0].subject, signer[1]), extensions), key

    root = ca("sinkserve test CA")
    server = leaf(
        "sinkserve gateway",
        root,
        x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        ),
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
    )
    client = leaf("alice", root, x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]))
    other = ca("some other CA")
    return Pki(
        ca=_write_cert(root[0], directory / "ca.pem"),
        server_cert=_write_cert(server[0], directory / "server.pem"),
        server_key=_write_key(server[1], directory / "server-key.pem"),
        client_cert=_write_cert(client[0], directory / "client.pem"),
        client_key=_write_key(client[1], directory / "client-key.pem"),
        other_ca=_write_cert(other[0], directory / "other-ca.pem"),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_settings(pki: Pki, *, client_ca: bool = False) -> dict[str, object]:
    settings: dict[str, object] = {
        "tls_cert_file": str(pki.server_cert),
        "tls_key_file": str(pki.server_key),
    }
    if client_ca:
        settings["tls_client_ca_file"] = str(pki.ca)
    return settings


async def outcome(client: ChatClient) -> tuple[grpc.StatusCode, str]:
    """How a unary call ends against a gateway without Triton."""
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await client.create_session()
    return excinfo.value.code(), excinfo.value.details() or ""


def reached_the_servicer(result: tuple[grpc.StatusCode, str]) -> bool:
    code, details = result
    return code is grpc.StatusCode.UNAVAILABLE and "Triton" in details


def stopped_at_the_handshake(result: tuple[grpc.StatusCode, str]) -> bool:
    code, details = result
    return code is grpc.StatusCode.UNAVAILABLE and "Triton" not in details


async def test_a_client_trusting_the_ca_talks_tls_to_the_gateway(
    make_gateway: GatewayFactory, pki: Pki
) -> None:
    gw = await make_gateway(**tls_settings(pki))
    tls = TLSConfig(root_ca_file=str(pki.ca))
    for host in ("127.0.0.1", "localhost"):  # both names are in the certificate
        async with ChatClient(f"{host}:{gw.port}", "alice-token", tls=tls) as client:
            assert reached_the_servicer(await outcome(client))
        async with ChatClient(f"{host}:{gw.port}", "wrong", tls=tls) as client:
            code, _ = await outcome(client)
            assert code is grpc.StatusCode.UNAUTHENTICATED


async def test_plaintext_and_untrusting_clients_cannot_connect_to_a_tls_gateway(
    make_gateway: GatewayFactory, pki: Pki
) -> None:
    gw = await make_gateway(**tls_settings(pki))
    async with ChatClient(target(gw), "alice-token") as plaintext:
        assert stopped_at_the_handshake(await outcome(plaintext))
    other = TLSConfig(root_ca_file=str(pki.other_ca))
    async with ChatClient(target(gw), "alice-token", tls=other) as untrusting:
        assert stopped_at_the_handshake(await outcome(untrusting))


async def test_a_gateway_requiring_client_certificates_admits_only_clients_with_one(
    make_gateway: GatewayFactory, pki: Pki
) -> None:
    gw = await make_gateway(**tls_settings(pki, client_ca=True))
    without = TLSConfig(root_ca_file=str(pki.ca))
    async with ChatClient(target(gw), "alice-token", tls=without) as client:
        assert stopped_at_the_handshake(await outcome(client))
    with_cert = TLSConfig(
        root_ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key)
    )
    async with ChatClient(target(gw), "alice-token", tls=with_cert) as client:
        assert reached_the_servicer(await outcome(client))
    # The certificate admits the connection; the token still decides the call.
    async with ChatClient(target(gw), "wrong", tls=with_cert) as client:
        code, _ = await outcome(client)
        assert code is grpc.StatusCode.UNAUTHENTICATED


async def test_the_sync_client_talks_tls_with_a_client_certificate(
    make_gateway: GatewayFactory, pki: Pki
) -> None:
    gw = await make_gateway(**tls_settings(pki, client_ca=True))
    tls = TLSConfig(
        root_ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key)
    )

    def call() -> grpc.RpcError:
        with SyncChatClient(target(gw), "alice-token", tls=tls) as client:
            with pytest.raises(grpc.RpcError) as excinfo:
                client.create_session()
            return excinfo.value

    # In a thread: the gateway serves from this test's event loop.
    err = await asyncio.to_thread(call)
    assert isinstance(err, grpc.aio.AioRpcError)  # the sync client runs the async one
    assert err.code() is grpc.StatusCode.UNAVAILABLE and "Triton" in (err.details() or "")


async def test_the_terminal_chat_connects_with_its_tls_flags(
    make_gateway: GatewayFactory, pki: Pki
) -> None:
    gw = await make_gateway(**tls_settings(pki, client_ca=True))
    args = chat_args(
        "--target", target(gw), "--token", "alice-token", "--tls-ca", str(pki.ca),
        "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key),
    )  # fmt: skip
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await _chat(args, io.StringIO(""), io.StringIO())
    assert reached_the_servicer((excinfo.value.code(), excinfo.value.details() or ""))


def test_a_client_certificate_needs_its_key() -> None:
    with pytest.raises(ValueError, match="both cert_file and key_file"):
        TLSConfig(cert_file="client.pem")


def test_a_non_loopback_host_needs_tls_or_an_explicit_plaintext_flag(pki: Pki) -> None:
    for host in ("0.0.0.0", "10.1.2.3", "gateway.internal"):
        with pytest.raises(ConfigError, match=re.escape(f"host={host!r}: beyond loopback")):
            GatewayConfig(host=host)
        assert GatewayConfig(host=host, insecure_plaintext=True).host == host
        assert GatewayConfig(host=host, **tls_settings(pki)).tls  # type: ignore[arg-type]
    for host in ("127.0.0.1", "::1", "localhost"):
        assert not GatewayConfig(host=host).tls


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"tls_cert_file": "CERT"}, "tls_key_file"),
        ({"tls_key_file": "KEY"}, "tls_cert_file"),
        ({"tls_cert_file": "CERT", "tls_key_file": "/no/such/key.pem"}, "tls_key_file"),
        ({"tls_cert_file": "/no/such.pem", "tls_key_file": "KEY"}, "tls_cert_file"),
        ({"tls_client_ca_file": "CA"}, "tls_client_ca_file"),
        (
            {"tls_cert_file": "CERT", "tls_key_file": "KEY", "tls_client_ca_file": "/no/ca"},
            "tls_client_ca_file",
        ),
        ({"tls_cert_file": "CERT", "tls_key_file": "KEY", "insecure_plaintext": True}, "insecure"),
    ],
)
def test_incomplete_or_missing_tls_files_are_config_errors_naming_the_field(
    pki: Pki, settings: dict[str, object], field: str
) -> None:
    real = {"CERT": str(pki.server_cert), "KEY": str(pki.server_key), "CA": str(pki.ca)}
    values = {k: real.get(v, v) if isinstance(v, str) else v for k, v in settings.items()}
    with pytest.raises(ConfigError, match=f"^{field}"):
        GatewayConfig(**values)  # type: ignore[arg-type]


def test_the_gateway_and_serve_commands_take_the_tls_and_plaintext_flags(pki: Pki) -> None:
    parse = build_parser().parse_args
    config_of = {"gateway": config_from_args, "serve": gateway_config}
    tls = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    tls += ["--tls-client-ca", str(pki.ca)]
    for command, config in config_of.items():
        with_tls = config(parse([command, "--host", "0.0.0.0", *tls]))
        files = (with_tls.tls_cert_file, with_tls.tls_key_file, with_tls.tls_client_ca_file)
        assert files == (str(pki.server_cert), str(pki.server_key), str(pki.ca))
        with pytest.raises(ConfigError, match=r"^host="):
            config(parse([command, "--host", "0.0.0.0"]))
        plain = config(parse([command, "--host", "0.0.0.0", "--insecure-plaintext"]))
        assert plain.insecure_plaintext and not plain.tls
