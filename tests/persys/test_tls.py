"""mTLS on the node's side: served AgentService and the call to the scheduler; plain only on loopback."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys
import warnings
from pathlib import Path

import grpc
import pytest

from fornax_sched.persys import tls
from tests.helpers import eventually, free_port, run

from .agentproc import A, agent_node, agent_stub
from .certs import CA
from .control_server import ControlServer


def _handshake(port: int, version: ssl.TLSVersion, cert: Path, key: Path, ca: Path) -> str:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (TLS 1.1 is, which is the point)
        ctx.minimum_version = ctx.maximum_version = version
    ctx.set_ciphers("DEFAULT@SECLEVEL=0")  # (so that this client can offer TLS 1.1 at all)
    ctx.load_verify_locations(str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        return str(s.version())


def test_mtls_both_ways_and_clients_without_the_cas_certificate_are_refused(tmp_path: Path) -> None:
    ca = CA(tmp_path / "ca")
    node_pair, sched_pair, client_pair = ca.issue("agent-tls"), ca.issue("scheduler"), ca.issue("client")
    stranger = CA(tmp_path / "other", "other-ca").issue("stranger")
    port = free_port()
    sched_files = tls.load(ca.path, sched_pair.cert, sched_pair.key)
    assert sched_files is not None

    async def refused(addr: str, creds: grpc.ChannelCredentials | None) -> grpc.aio.AioRpcError:
        async with agent_stub(addr, creds) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.HealthCheck(A.HealthCheckRequest(), timeout=3)
            return e.value

    async def go() -> None:
        server = await ControlServer(port, credentials=tls.server_credentials(sched_files)).start()
        n, addr = agent_node(tmp_path, "agent-tls", [
            "--persys-scheduler", f"127.0.0.1:{port}",
            "--tls-ca", str(ca.path), "--tls-cert", str(node_pair.cert), "--tls-key", str(node_pair.key)])
        try:
            # The node called a scheduler that requires client certificates: its own was accepted.
            reg = await eventually(lambda: _last(server.registrations), timeout=10)
            assert reg.node_id == "agent-tls"
            await eventually(lambda: _last(server.heartbeats), timeout=10)

            client = tls.load(ca.path, client_pair.cert, client_pair.key)
            assert client is not None
            async with agent_stub(addr, tls.channel_credentials(client)) as stub:
                assert (await stub.HealthCheck(A.HealthCheckRequest(), timeout=5)).healthy

            no_cert = grpc.ssl_channel_credentials(root_certificates=ca.path.read_bytes())
            assert (await refused(addr, no_cert)).code() == grpc.StatusCode.UNAVAILABLE
            other = grpc.ssl_channel_credentials(root_certificates=ca.path.read_bytes(),
                                                 private_key=stranger.key.read_bytes(),
                                                 certificate_chain=stranger.cert.read_bytes())
            assert (await refused(addr, other)).code() == grpc.StatusCode.UNAVAILABLE
            assert (await refused(addr, None)).code() == grpc.StatusCode.UNAVAILABLE  # plain

            agent_port = int(addr.rsplit(":", 1)[1])
            version = await asyncio.to_thread(_handshake, agent_port, ssl.TLSVersion.TLSv1_2, client_pair.cert,
                                              client_pair.key, ca.path)
            assert version == "TLSv1.2"
            with pytest.raises(ssl.SSLError) as e:
                await asyncio.to_thread(_handshake, agent_port, ssl.TLSVersion.TLSv1_1, client_pair.cert,
                                        client_pair.key, ca.path)
            # The server hung up on the TLS 1.1 hello (or said protocol_version); our client did offer it.
            assert isinstance(e.value, ssl.SSLEOFError) or "PROTOCOL_VERSION" in str(e.value), e.value
            assert "NO_PROTOCOLS_AVAILABLE" not in str(e.value)
            version = await asyncio.to_thread(_handshake, agent_port, ssl.TLSVersion.TLSv1_3, client_pair.cert,
                                              client_pair.key, ca.path)
            assert version == "TLSv1.3"
        finally:
            await server.stop()
            assert n.stop() == 0

    run(go(), timeout=60)


@pytest.mark.parametrize("args, why", [
    (["--persys", "0.0.0.0:0"], "--persys 0.0.0.0:0: plain gRPC is allowed on a loopback address only"),
    (["--persys", "127.0.0.1:0", "--persys-scheduler", "192.0.2.1:8085"],
     "--persys-scheduler 192.0.2.1:8085: plain gRPC is allowed on a loopback address only"),
    (["--persys", "127.0.0.1:0", "--tls-ca", "/nonexistent/ca.pem", "--tls-cert", "/x", "--tls-key", "/y"],
     "--tls-ca /nonexistent/ca.pem: No such file or directory"),
    (["--persys", "127.0.0.1:0", "--tls-cert", "/x"], "--tls-ca, --tls-key missing"),
])
def test_plain_off_loopback_and_bad_credentials_are_refused_at_start(tmp_path: Path, args: list[str],
                                                                    why: str) -> None:
    out = subprocess.run([sys.executable, "-m", "fornax_sched.node.cli", "serve", "--name", "x", "--images",
                          str(tmp_path), "--state", str(tmp_path / "s"), "--listen", f"tcp!127.0.0.1!{free_port()}",
                          "--gossip", f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}", "--broadcast", "off", *args],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and why in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_key_that_is_not_the_certificates_is_refused(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    a, b = ca.issue("a"), ca.issue("b")
    with pytest.raises(tls.TLSError, match="is the key the certificate's"):
        tls.load(ca.path, a.cert, b.key)
    with pytest.raises(tls.TLSError, match="not a PEM file"):
        (tmp_path / "junk").write_text("junk")
        tls.load(tmp_path / "junk", a.cert, a.key)


def test_insecure_allows_plain_off_loopback(tmp_path: Path) -> None:
    n, addr = agent_node(tmp_path, "agent-any", ["--insecure"])
    n.stop()
    wide = f"0.0.0.0:{free_port()}"
    n.extra = ["--persys", wide, "--insecure"]
    n.start()
    try:
        async def go() -> None:
            async with agent_stub(wide.replace("0.0.0.0", "127.0.0.1")) as stub:
                assert (await stub.HealthCheck(A.HealthCheckRequest(), timeout=5)).healthy
        run(go(), timeout=30)
    finally:
        assert n.stop() == 0


async def _last(items: list) -> object:
    return items[-1] if items else None
