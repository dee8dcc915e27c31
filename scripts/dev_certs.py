"""A local CA and certificates for development and tests: coordinator gRPC and Redis TLS.

    python scripts/dev_certs.py DIR [--hosts localhost,127.0.0.1,coordinator] [--clients acme]

writes into DIR (mode 0600 keys):
  ca.crt, ca.key            the CA (kept and reused when DIR already holds one)
  server.crt, server.key    a server certificate for every name/IP in --hosts
  <client>.crt, <client>.key  one client certificate per --clients id (mutual TLS; CN = the id)

Production certificates come from the cluster's issuer (deploy/README.md, "TLS"); this script
only makes throwaway ones. Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAYS = 30  # throwaway: short enough that a leaked dev key soon stops mattering
DEFAULT_HOSTS = "localhost,127.0.0.1,::1"
Key = ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: Key) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _builder(
    subject: str, issuer: x509.Name, public: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + datetime.timedelta(days=DAYS))
    )


def load_or_make_ca(out: Path) -> tuple[x509.Certificate, Key]:
    """The CA in `out` if there is one (so clients can be added later), else a new one."""
    crt, key_file = out / "ca.crt", out / "ca.key"
    if crt.is_file() and key_file.is_file():
        key = serialization.load_pem_private_key(key_file.read_bytes(), None)
        if not isinstance(key, Key):
            raise ValueError(f"{key_file}: not an EC key made by this script")
        return x509.load_pem_x509_certificate(crt.read_bytes()), key
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder("pema dev CA", _name("pema dev CA"), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(key_file, key)
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def issue(
    out: Path,
    stem: str,
    ca: tuple[x509.Certificate, Key],
    cn: str,
    hosts: Sequence[str] = (),
    client: bool = False,
) -> Path:
    """Write out/<stem>.crt and .key signed by the CA: a server cert for `hosts`, or a client
    cert whose CN names the tenant. Returns the certificate's path."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        _builder(cn, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(out / f"{stem}.key", key)
    path = out / f"{stem}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out", type=Path, help="folder to write into (created if missing)")
    p.add_argument(
        "--hosts",
        default=DEFAULT_HOSTS,
        help=f"comma-separated DNS names and IPs the server certificate is valid for "
        f"(default: {DEFAULT_HOSTS})",
    )
    p.add_argument(
        "--clients",
        default="",
        help="comma-separated tenant ids to issue client certificates for (default: none)",
    )
    a = p.parse_args(argv)
    hosts = [h.strip() for h in a.hosts.split(",") if h.strip()]
    clients = [c.strip() for c in a.clients.split(",") if c.strip()]
    if not hosts:
        print("dev_certs: error: --hosts names no host", file=sys.stderr)
        return 2
    bad = [c for c in clients if not c.replace("-", "").replace("_", "").isalnum()]
    if bad:
        print(f"dev_certs: error: client ids must be plain names, got {bad}", file=sys.stderr)
        return 2
    try:
        a.out.mkdir(parents=True, exist_ok=True)
        ca = load_or_make_ca(a.out)
        issue(a.out, "server", ca, hosts[0], hosts)
        for c in clients:
            issue(a.out, c, ca, c, client=True)
    except (OSError, ValueError) as e:
        print(f"dev_certs: error: {e}", file=sys.stderr)
        return 2
    print(
        f"dev_certs: CA, server ({', '.join(hosts)}) and {len(clients)} client cert(s) in {a.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
