"""The coordinator's configuration: one dataclass, validated at construction.

Tenants come from a JSON or TOML file (`--tenants`) or the PEMA_COORDINATOR_TENANTS environment
variable (the same JSON). Tokens are stored only as SHA-256 hex digests:

    {"tenants": [{"id": "acme", "token_sha256": "<hex>",
                  "limits": {"max_concurrent_calls": 8, "max_tokens_in_flight": 65536,
                             "max_sequence_length": 2048, "max_decode_sessions": 4}}]}

`pema-coordinator hash-token TOKEN` prints the digest to put there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pema.dtypes import DTYPES, check_device_name
from pema.errors import PemaError

TENANTS_ENV = "PEMA_COORDINATOR_TENANTS"
# Tenant ids become Prometheus label values and log fields: keep them short and plain.
TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class ConfigError(PemaError):
    """The coordinator's configuration is invalid."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TenantLimits:
    max_concurrent_calls: int = 8
    max_tokens_in_flight: int = 65536
    max_sequence_length: int = 2048
    max_decode_sessions: int = 4

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"tenant limit {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Tenant:
    id: str
    token_sha256: str
    limits: TenantLimits = field(default_factory=TenantLimits)

    def __post_init__(self) -> None:
        if not TENANT_ID.match(self.id):
            raise ConfigError(f"tenant id {self.id!r} must match {TENANT_ID.pattern}")
        if not re.fullmatch(r"[0-9a-f]{64}", self.token_sha256):
            raise ConfigError(f"tenant {self.id}: token_sha256 must be 64 lowercase hex digits")


def parse_tenants(data: Any, source: str) -> tuple[Tenant, ...]:
    try:
        entries = data["tenants"]
        tenants = tuple(
            Tenant(
                id=e["id"],
                token_sha256=e["token_sha256"],
                limits=TenantLimits(**e.get("limits", {})),
            )
            for e in entries
        )
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{source}: malformed tenants ({type(e).__name__}: {e})") from None
    return tenants


def load_tenants(path: Path | None) -> tuple[Tenant, ...]:
    """Tenants from a .json/.toml file, else from $PEMA_COORDINATOR_TENANTS (JSON)."""
    if path is not None:
        try:
            text = path.read_text()
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read tenants ({e})") from None
        return parse_tenants(data, str(path))
    env = os.environ.get(TENANTS_ENV)
    if env:
        try:
            return parse_tenants(json.loads(env), TENANTS_ENV)
        except ValueError as e:
            raise ConfigError(f"{TENANTS_ENV}: not JSON ({e})") from None
    raise ConfigError(f"no tenants: pass --tenants FILE or set {TENANTS_ENV}")


@dataclass(frozen=True)
class TlsConfig:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: clients must present a certificate it signed (mTLS)

    def __post_init__(self) -> None:
        for p in (self.cert, self.key, self.client_ca):
            if p is not None and not p.is_file():
                raise ConfigError(f"TLS file {p} does not exist")


@dataclass(frozen=True)
class CoordinatorConfig:
    tenants: tuple[Tenant, ...]
    model: Path | None = None  # None: the default model
    dtype: str | None = None  # None: $PEMA_DTYPE, else auto (pema.dtypes.resolve_dtype)
    device: str | None = None  # None: $PEMA_DEVICE, else auto (pema.dtypes.resolve_device)
    host: str = "[::]"
    port: int = 50051  # 0: pick a free port (tests)
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = 9100  # None: no /metrics endpoint; 0: a free port
    tls: TlsConfig | None = None
    max_batch_tokens: int = 4096  # rows x longest row of one encode forward pass
    max_queued_tokens: int = 262144  # across tenants; beyond it new work is UNAVAILABLE
    max_items_per_request: int = 4096
    max_message_bytes: int = 8 << 20  # a larger request is INVALID_ARGUMENT
    head_chunk_bytes: int = 1 << 20
    session_idle_seconds: float = 120.0  # a detached decode session is kept this long for resume
    grace_seconds: float = 30.0  # SIGTERM: in-flight calls get this long to finish
    rpc_threads: int = 32
    threads: int | None = None  # torch CPU threads of the model worker
    decode_wait_seconds: float = 0.02  # a decode pass waits this long for the last pass's sessions

    def __post_init__(self) -> None:
        if not self.tenants:
            raise ConfigError("at least one tenant is required")
        ids = [t.id for t in self.tenants]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"duplicate tenant ids in {ids}")
        hashes = [t.token_sha256 for t in self.tenants]
        if len(set(hashes)) != len(hashes):
            raise ConfigError("two tenants share a token")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.device is not None:
            try:
                check_device_name(self.device)
            except PemaError as e:
                raise ConfigError(str(e)) from None
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port {self.port} out of range")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"metrics port {self.metrics_port} out of range")
        for name in (
            "max_batch_tokens",
            "max_queued_tokens",
            "max_items_per_request",
            "max_message_bytes",
            "head_chunk_bytes",
            "rpc_threads",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads must be positive")
        if self.session_idle_seconds < 0 or self.grace_seconds < 0 or self.decode_wait_seconds < 0:
            raise ConfigError("durations must not be negative")
        if self.model is not None and not (self.model / "config.json").is_file():
            raise ConfigError(f"{self.model}: not a Hugging Face model folder")

    def with_(self, **changes: Any) -> CoordinatorConfig:
        return replace(self, **changes)
