"""mTLS for the Persys bridge: credential files, grpc credentials, and the rule for plain connections.

Both ends of the bridge use one CA, certificate and key (PEM): a server
requires client certificates signed by the CA, a client presents its own
and checks the server's against the CA (the certificate must name the
address dialled, e.g. a SAN ``IP:127.0.0.1``).  gRPC's TLS (BoringSSL)
speaks TLS 1.2 and 1.3 only.  Without certificates a connection is plain,
which ``check_plain`` allows only on a loopback address unless the user
said ``--insecure``.  Files are checked when loaded (readable, PEM, the key
matching the certificate, the CA loadable) so a mistake is a one-line error
at start, not a handshake failure later.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


class TLSError(ValueError):
    """Credential files that cannot be used; the message names the option and the file."""


@dataclass(frozen=True)
class TLSFiles:
    ca: bytes
    cert: bytes
    key: bytes


def load(ca: str | Path | None, cert: str | Path | None, key: str | Path | None) -> TLSFiles | None:
    """The three files read and checked (TLSError if not); None when none is given."""
    given = {"--tls-ca": ca, "--tls-cert": cert, "--tls-key": key}
    if all(v is None for v in given.values()):
        return None
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise TLSError(f"--tls-ca, --tls-cert and --tls-key go together: {', '.join(missing)} missing")
    data = {}
    for opt, path in given.items():
        try:
            raw = Path(str(path)).read_bytes()
        except OSError as e:
            raise TLSError(f"{opt} {path}: {e.strerror or e}") from None
        if b"-----BEGIN " not in raw:
            raise TLSError(f"{opt} {path}: not a PEM file")
        data[opt] = raw
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cadata=data["--tls-ca"].decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as e:
        raise TLSError(f"--tls-ca {ca}: not a usable CA certificate: {e}") from None
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as e:
        raise TLSError(f"--tls-cert {cert} with --tls-key {key}: {e.reason or e} "
                       f"(is the key the certificate's?)") from None
    return TLSFiles(data["--tls-ca"], data["--tls-cert"], data["--tls-key"])


def server_credentials(t: TLSFiles) -> grpc.ServerCredentials:
    """A server that requires a client certificate signed by the CA."""
    return grpc.ssl_server_credentials([(t.key, t.cert)], root_certificates=t.ca, require_client_auth=True)


def channel_credentials(t: TLSFiles) -> grpc.ChannelCredentials:
    """A client that presents its certificate and checks the server's against the CA."""
    return grpc.ssl_channel_credentials(root_certificates=t.ca, private_key=t.key, certificate_chain=t.cert)


def is_loopback(host: str) -> bool:
    host = host.removeprefix("[").removesuffix("]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plain(what: str, host: str, insecure: bool) -> None:
    """Refuse plain gRPC to or from ``host`` unless it is a loopback address or ``insecure``."""
    if not insecure and not is_loopback(host):
        raise TLSError(f"{what}: plain gRPC is allowed on a loopback address only: give --tls-ca, --tls-cert "
                       f"and --tls-key (mTLS), or --insecure")
