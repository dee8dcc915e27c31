"""The coordinator's configuration: one dataclass, validated at construction.

Tenants come from a JSON or TOML file (`--tenants`) or the PEMA_COORDINATOR_TENANTS environment
variable (the same JSON), validated by pydantic: unknown keys are errors, never ignored. Tokens are
stored only as SHA-256 hex digests; a tenant may hold several at once (a token rotation: add the
new digest, hand out the new token, drop the old digest; `kill -HUP` reloads the file):

    {"tenants": [{"id": "acme", "token_sha256": "<hex>" | ["<hex>", "<hex>"],
                  "limits": {"max_concurrent_calls": 8, "max_tokens_in_flight": 65536,
                             "max_sequence_length": 2048, "max_decode_sessions": 4}}]}

`pema-coordinator hash-token` reads a token on stdin (or makes one) and prints the digest.
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

from pydantic import ConfigDict, TypeAdapter, ValidationError, field_validator
from pydantic.dataclasses import dataclass as validated_dataclass

from pema.errors import PemaError
from pema.settings import DTYPE_NAMES
from proto.tls import read_pem

TENANTS_ENV = "PEMA_COORDINATOR_TENANTS"
# Tenant ids become Prometheus label values and log fields: keep them short and plain.
TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_STRICT = ConfigDict(extra="forbid", strict=True)
# Threads of the RPC pool never handed to admitted calls: they run the admission check itself.
RPC_HEADROOM = 4


class ConfigError(PemaError):
    """The coordinator's configuration is invalid."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@validated_dataclass(frozen=True, config=_STRICT)
class TenantLimits:
    max_concurrent_calls: int = 8
    max_tokens_in_flight: int = 65536
    max_sequence_length: int = 2048
    max_decode_sessions: int = 4

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"tenant limit {name} must be a positive integer, got {value!r}")


@validated_dataclass(frozen=True, config=_STRICT)
class Tenant:
    id: str
    # One digest, or several during a token rotation (each one authenticates the tenant).
    token_sha256: tuple[str, ...]
    limits: TenantLimits = field(default_factory=TenantLimits)

    @field_validator("token_sha256", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if isinstance(value, str):
            return (value,)
        return tuple(value) if isinstance(value, list) else value

    def __post_init__(self) -> None:
        if not TENANT_ID.match(self.id):
            raise ConfigError(f"tenant id {self.id!r} must match {TENANT_ID.pattern}")
        if not self.token_sha256:
            raise ConfigError(f"tenant {self.id}: token_sha256 lists no digest")
        for digest in self.token_sha256:
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ConfigError(
                    f"tenant {self.id}: token_sha256 must be 64 lowercase hex digits "
                    "(pema-coordinator hash-token prints one)"
                )


@validated_dataclass(frozen=True, config=_STRICT)
class TenantsFile:
    tenants: tuple[Tenant, ...]


_TENANTS_FILE = TypeAdapter(TenantsFile)


def _first_error(e: ValidationError) -> str:
    """pydantic's first complaint as one line: where (tenants.1.limits.max_calls) and what."""
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "top level"
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"unknown key {where}"
    if err["type"] == "missing":
        return f"missing key {where}"
    return f"{where}: {err['msg']} (got {err.get('input')!r})"


def parse_tenants(data: Any, source: str) -> tuple[Tenant, ...]:
    try:
        # JSON input mode: lists are accepted where tuples are declared.
        parsed = _TENANTS_FILE.validate_python(data, strict=False)
        check_tenants(parsed.tenants)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_first_error(e)}") from None
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return parsed.tenants


def check_tenants(tenants: tuple[Tenant, ...]) -> None:
    if not tenants:
        raise ConfigError("at least one tenant is required")
    ids = [t.id for t in tenants]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"duplicate tenant ids in {ids}")
    hashes = [h for t in tenants for h in t.token_sha256]
    if len(set(hashes)) != len(hashes):
        raise ConfigError("two tenants (or one tenant twice) share a token")


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
        self.pem()  # a wrong path or a non-PEM file is one line at start, not a failed bind

    def pem(self) -> tuple[bytes, bytes, bytes | None]:
        """(certificate chain, key, client CA) as PEM bytes."""
        return (
            read_pem(self.cert, "certificate"),
            read_pem(self.key, "key"),
            read_pem(self.client_ca, "client CA") if self.client_ca else None,
        )


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
    # A plaintext port serving only grpc.health.v1, for kubelet probes, which cannot speak TLS
    # to the main port. None: no such port; 0: a free port (tests).
    health_port: int | None = None
    max_batch_tokens: int = 4096  # rows x longest row of one encode forward pass
    max_queued_tokens: int = 262144  # across tenants; beyond it new work is UNAVAILABLE
    max_items_per_request: int = 4096
    max_message_bytes: int = 8 << 20  # a larger request is INVALID_ARGUMENT
    head_chunk_bytes: int = 1 << 20
    session_idle_seconds: float = 120.0  # a detached decode session is kept this long for resume
    grace_seconds: float = 30.0  # SIGTERM: in-flight calls get this long to finish
    rpc_threads: int = 32  # tenants' calls; rpc_threads - RPC_HEADROOM may be admitted at once
    reserved_calls: int = 2  # of those, each tenant's own: no other tenant can take them
    reflection: bool = False  # gRPC server reflection (unauthenticated: off unless asked for)
    threads: int | None = None  # torch CPU threads of the model worker
    decode_wait_seconds: float = 0.02  # a decode pass waits this long for the last pass's sessions

    def __post_init__(self) -> None:
        check_tenants(self.tenants)
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"dtype must be one of {DTYPE_NAMES}, got {self.dtype!r}")
        if self.device is not None:
            from pema.dtypes import check_device_name  # loads torch: not while parsing a CLI

            try:
                check_device_name(self.device)
            except PemaError as e:
                raise ConfigError(str(e)) from None
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port {self.port} out of range")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"metrics port {self.metrics_port} out of range")
        if self.health_port is not None and not 0 <= self.health_port < 65536:
            raise ConfigError(f"health port {self.health_port} out of range")
        for name in (
            "max_batch_tokens",
            "max_queued_tokens",
            "max_items_per_request",
            "max_message_bytes",
            "head_chunk_bytes",
            "rpc_threads",
            "reserved_calls",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive")
        budget = self.rpc_threads - RPC_HEADROOM
        if self.reserved_calls * len(self.tenants) > budget:
            raise ConfigError(
                f"{len(self.tenants)} tenants x {self.reserved_calls} reserved calls exceed the "
                f"{budget} calls {self.rpc_threads} RPC threads admit; raise rpc_threads"
            )
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads must be positive")
        if self.session_idle_seconds < 0 or self.grace_seconds < 0 or self.decode_wait_seconds < 0:
            raise ConfigError("durations must not be negative")
        if self.model is not None and not (self.model / "config.json").is_file():
            # Only here, where the value is no folder: the registry's module loads torch.
            from pema.models import MODELS

            if str(self.model) not in MODELS:
                raise ConfigError(
                    f"{self.model}: not a Hugging Face model folder nor a model name "
                    f"({', '.join(MODELS)})"
                )

    def with_(self, **changes: Any) -> CoordinatorConfig:
        return replace(self, **changes)
