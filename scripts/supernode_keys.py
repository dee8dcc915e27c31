"""Per-tenant SuperNode authentication keys (ECDSA P-384, OpenSSH format) for Flower.

    python scripts/supernode_keys.py DIR TENANT [TENANT ...]

writes DIR/TENANT (private key, mode 0600: goes to that tenant's SuperNode only, as
`--auth-supernode-private-key`) and DIR/TENANT.pub (the operator registers it:
`flwr supernode register DIR/TENANT.pub <connection> --name TENANT`). An existing key is kept.
`ssh-keygen -t ecdsa -b 384 -N '' -f DIR/TENANT` makes the same files. Bad input: one line on
stderr, exit 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

TENANT_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


def make_key(out: Path, tenant: str) -> Path:
    """DIR/TENANT and DIR/TENANT.pub (kept if present); returns the public key's path."""
    private, public = out / tenant, out / f"{tenant}.pub"
    if private.is_file() and public.is_file():
        return public
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    ssh = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    public.write_bytes(ssh + f" {tenant}\n".encode())
    return public


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out", type=Path, help="folder to write into (created if missing)")
    p.add_argument("tenants", nargs="+", help="tenant ids, one key pair each")
    a = p.parse_args(argv)
    bad = [t for t in a.tenants if not TENANT_ID.fullmatch(t)]
    if bad:
        print(f"supernode_keys: error: not tenant ids: {bad}", file=sys.stderr)
        return 2
    try:
        a.out.mkdir(parents=True, exist_ok=True)
        for t in a.tenants:
            make_key(a.out, t)
    except OSError as e:
        print(f"supernode_keys: error: {e}", file=sys.stderr)
        return 2
    print(f"supernode_keys: {len(a.tenants)} key pair(s) in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
