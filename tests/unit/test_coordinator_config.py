"""The coordinator's tenants file (pydantic, unknown keys refused, several token digests) and
`pema-coordinator hash-token` (the secret on stdin, never on the command line)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.config import ConfigError, load_tenants, parse_tenants

REPO = Path(__file__).resolve().parents[2]
H1, H2 = "1" * 64, "2" * 64


def test_several_digests_per_tenant() -> None:
    (t,) = parse_tenants({"tenants": [{"id": "acme", "token_sha256": [H1, H2]}]}, "f")
    assert t.token_sha256 == (H1, H2)
    (t,) = parse_tenants({"tenants": [{"id": "acme", "token_sha256": H1}]}, "f")
    assert t.token_sha256 == (H1,)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"id": "a", "token_sha256": H1, "limit": {}}, "unknown key tenants.0.limit"),
        (
            {"id": "a", "token_sha256": H1, "limits": {"max_calls": 2}},
            "unknown key tenants.0.limits.max_calls",
        ),
        (
            {"id": "a", "token_sha256": H1, "limits": {"max_decode_sessions": "two"}},
            "tenants.0.limits.max_decode_sessions: Input should be a valid integer",
        ),
        ({"id": "a"}, "missing key tenants.0.token_sha256"),
        ({"id": "a", "token_sha256": "s3cret"}, "64 lowercase hex digits"),
        ({"id": "a", "token_sha256": []}, "lists no digest"),
        ({"id": "Acme!", "token_sha256": H1}, "tenant id 'Acme!'"),
    ],
)
def test_bad_tenants_name_the_key(entry: dict[str, object], message: str, tmp_path: Path) -> None:
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"tenants": [entry]}))
    with pytest.raises(ConfigError) as e:
        load_tenants(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_a_digest_shared_between_tenants_is_refused() -> None:
    doc = {"tenants": [{"id": "a", "token_sha256": [H1]}, {"id": "b", "token_sha256": [H2, H1]}]}
    with pytest.raises(ConfigError, match="share a token"):
        parse_tenants(doc, "f")


def _hash_token(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "hash-token", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


def test_hash_token_reads_stdin_or_generates() -> None:
    proc = _hash_token(stdin="s3cret\n")
    assert proc.returncode == 0 and proc.stdout == hashlib.sha256(b"s3cret").hexdigest() + "\n"
    proc = _hash_token("--generate")
    token, digest = proc.stdout.split()
    assert len(token) >= 32 and digest == hashlib.sha256(token.encode()).hexdigest()
    proc = _hash_token()  # nothing on stdin
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no token" in proc.stderr
    proc = _hash_token("s3cret")  # on the command line: refused, it would land in shell history
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr
