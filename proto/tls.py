"""TLS material for the wire (coordinator gRPC and Redis): one reader both sides use.

A missing, unreadable or non-PEM file is a PemaError naming the flag's file, raised before any
connection is attempted; gRPC itself would only fail later, during a handshake, with C-core text.
"""

from __future__ import annotations

from pathlib import Path

from pema.errors import PemaError


class TlsFileError(PemaError):
    """A certificate or key file is missing or is not PEM."""


def read_pem(path: Path, what: str) -> bytes:
    """The bytes of a PEM file (`what` names it in the error: "CA certificate", "key", …)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TlsFileError(f"TLS {what} {path} does not exist") from None
    except OSError as e:
        raise TlsFileError(f"TLS {what} {path} cannot be read ({e.strerror})") from None
    if b"-----BEGIN " not in data:
        raise TlsFileError(f"TLS {what} {path} is not a PEM file")
    return data
