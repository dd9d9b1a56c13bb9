"""TLS between Tandem processes: certificates from files named by env vars, and `tandem certs` (a local CA).

With `TANDEM_TLS_CA`, `TANDEM_TLS_CERT` and `TANDEM_TLS_KEY` set (PEM files), every gRPC server listens
with TLS and every internal channel (gateway -> workers, prefill -> decode KV pushes, probes) presents the
certificate: mutual TLS. The gateway's public gRPC door then speaks TLS too, without demanding client
certificates (API keys authenticate its clients). Unset = plaintext, as before.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.contracts.errors import InvalidArgument

ENV = ("TANDEM_TLS_CA", "TANDEM_TLS_CERT", "TANDEM_TLS_KEY")


@dataclass(frozen=True, slots=True)
class TLSFiles:
    ca: bytes
    cert: bytes
    key: bytes


def from_env(env: dict[str, str] | None = None) -> TLSFiles | None:
    """The PEM contents the env vars name; None when none is set; InvalidArgument when some are missing."""
    env = os.environ if env is None else env
    paths = [env.get(name) or "" for name in ENV]
    if not any(paths):
        return None
    missing = [name for name, p in zip(ENV, paths, strict=True) if not p]
    if missing:
        raise InvalidArgument(f"{missing[0]}: TLS needs all of {', '.join(ENV)} (missing {', '.join(missing)})",
                              param=missing[0])
    out = []
    for name, p in zip(ENV, paths, strict=True):
        try:
            out.append(Path(p).read_bytes())
        except OSError as exc:
            raise InvalidArgument(f"{name}: cannot read {p!r}: {exc.strerror}", param=name) from None
    return TLSFiles(*out)


def make_certs(folder: Path, hosts: Sequence[str] = (), days: int = 365) -> dict[str, Path]:
    """A CA and one node certificate (server and client use) for localhost, 127.0.0.1, ::1 and `hosts`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    later = now + datetime.timedelta(days=days)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("tandem local CA")).issuer_name(name("tandem local CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(later)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    sans: list[x509.GeneralName] = []
    for h in ("localhost", "127.0.0.1", "::1", *hosts):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    node_key = ec.generate_private_key(ec.SECP256R1())
    node = (x509.CertificateBuilder().subject_name(name("tandem node")).issuer_name(ca.subject)
            .public_key(node_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(later)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))

    def key_pem(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    files = {"ca": folder / "ca.pem", "ca_key": folder / "ca-key.pem", "cert": folder / "node.pem",
             "key": folder / "node-key.pem"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(node.public_bytes(serialization.Encoding.PEM))
    for k, path in ((ca_key, files["ca_key"]), (node_key, files["key"])):
        path.write_bytes(key_pem(k))
        path.chmod(0o600)
    return files


def register(group: Callable[[str], Any]) -> None:
    import typer

    app = group("")

    @app.command("certs")
    def certs_cmd(
        folder: str = typer.Argument("certs", help="where to write ca.pem, ca-key.pem, node.pem, node-key.pem"),
        host: list[str] = typer.Option([], "--host", help="extra DNS name or IP the certificate covers (repeatable)"),
        days: int = typer.Option(365, "--days", help="validity in days"),
    ) -> None:
        """Make a local CA and a node certificate for mutual TLS inside a cluster; prints the env to export."""
        files = make_certs(Path(folder), host, days)
        typer.echo(f"export TANDEM_TLS_CA={files['ca'].resolve()}")
        typer.echo(f"export TANDEM_TLS_CERT={files['cert'].resolve()}")
        typer.echo(f"export TANDEM_TLS_KEY={files['key'].resolve()}")
