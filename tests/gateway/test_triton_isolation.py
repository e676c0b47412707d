"""Triton's APIs have no authentication and control the models (load, unload), so they
stay out of every client's reach: tritonserver listens on loopback only, and the
gateway, the one door in, serves none of Triton's methods.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc.aio as triton_aio
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2

from sinkserve.cli import build_parser
from sinkserve.cluster import process_tree
from sinkserve.serve import triton_server
from sinkserve.triton_server.launcher import Installation, TritonServer
from tests.gateway.conftest import GatewayFactory, served, target

ALICE = (("authorization", "Bearer alice-token"),)
INFERENCE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
LOOPBACK = ipaddress.ip_address("127.0.0.1")
ADDRESS_FLAGS = ("--grpc-address=", "--http-address=", "--metrics-address=")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def addresses(server: TritonServer) -> dict[str, str]:
    """The listening addresses on the tritonserver command line the launcher builds."""
    install = Installation(Path("/opt/tritonserver/bin/tritonserver"), Path("/backends"), {})
    return {
        flag: arg.removeprefix(flag)
        for arg in server.command(install)
        for flag in ADDRESS_FLAGS
        if arg.startswith(flag)
    }


def test_the_launcher_and_the_triton_command_listen_on_loopback_by_default() -> None:
    assert addresses(TritonServer()) == dict.fromkeys(ADDRESS_FLAGS, "127.0.0.1")
    args = build_parser().parse_args(["triton"])
    assert (args.host, args.metrics_host) == ("127.0.0.1", "127.0.0.1")


def test_serve_keeps_tritons_apis_on_loopback_whatever_its_host() -> None:
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--insecure-plaintext"])
    assert addresses(triton_server(args)) == {
        "--grpc-address=": "127.0.0.1",
        "--http-address=": "127.0.0.1",
        "--metrics-address=": "0.0.0.0",  # read-only metrics, like the gateway's
    }


def _address(hex_address: str) -> Address:
    """An address as /proc/net/tcp{,6} writes it (32-bit words in host, little-endian,
    order). An IPv4-mapped IPv6 address (gRPC's dual-stack socket bound to 127.0.0.1
    shows as ::ffff:127.0.0.1) is given as the IPv4 address it accepts alone."""
    raw = bytes.fromhex(hex_address)
    address = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def listening_sockets() -> dict[int, tuple[Address, int]]:
    """inode -> (address, port) of every listening TCP socket in this network namespace."""
    found: dict[int, tuple[Address, int]] = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address, port = fields[1].split(":")
            found[int(fields[9])] = (_address(address), int(port, 16))
    return found


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):  # the process ended, or is not ours
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(int(link[8:-1]))
    return inodes


def test_every_port_of_the_real_tritonserver_is_bound_to_loopback(triton_url: str) -> None:
    if os.environ.get("SINKSERVE_E2E_TRITON_URL"):
        pytest.skip("Triton runs elsewhere: its sockets are not on this machine")
    port = int(triton_url.rsplit(":", 1)[1])
    sockets = listening_sockets()
    (grpc_inode,) = [inode for inode, (_, p) in sockets.items() if p == port]
    holders = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    owners = [pid for pid in holders if grpc_inode in socket_inodes(pid)]
    assert owners, "no process holds Triton's gRPC socket"
    # tritonserver and whatever it started (the Python backend's stub processes).
    tree = {pid for owner in owners for pid in process_tree(owner)}
    bound = {sockets[i] for pid in tree for i in socket_inodes(pid) if i in sockets}
    assert len(bound) >= 3, bound  # gRPC, HTTP, metrics
    assert {address for address, _ in bound} == {LOOPBACK}, bound


async def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await call  # type: ignore[misc]
    return excinfo.value.code()


async def test_no_triton_method_is_served_on_the_gateways_port(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    model_control: list[tuple[str, Message, type[Message]]] = [
        (
            "RepositoryModelUnload",
            service_pb2.RepositoryModelUnloadRequest(model_name="sinkserve"),
            service_pb2.RepositoryModelUnloadResponse,
        ),
        (
            "RepositoryModelLoad",
            service_pb2.RepositoryModelLoadRequest(model_name="sinkserve"),
            service_pb2.RepositoryModelLoadResponse,
        ),
        (
            "RepositoryIndex",
            service_pb2.RepositoryIndexRequest(),
            service_pb2.RepositoryIndexResponse,
        ),
    ]
    async with grpc.aio.insecure_channel(target(gw)) as channel:
        for name, request, response in model_control:
            call = channel.unary_unary(
                f"/{INFERENCE.full_name}/{name}",
                request_serializer=type(request).SerializeToString,
                response_deserializer=response.FromString,
            )
            # With a valid token: the gateway has no such method for anyone.
            assert await code_of(call(request, metadata=ALICE)) is grpc.StatusCode.UNIMPLEMENTED
        # Every other method of Triton's service too (an empty message, raw bytes).
        for method in INFERENCE.methods:
            raw = channel.unary_unary(f"/{INFERENCE.full_name}/{method.name}")
            code = await code_of(raw(b"", metadata=ALICE))
            assert code is grpc.StatusCode.UNIMPLEMENTED, method.name
    triton = triton_aio.InferenceServerClient(triton_url)
    try:
        assert await triton.is_model_ready("sinkserve"), "the unload never reached Triton"
    finally:
        await triton.close()
