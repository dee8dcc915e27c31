"""The Redis memory cache: the shard mechanism of memory_store over keys `pema:{tenant}:mem:…`.

Keys: `pema:{tenant}:mem:{address}:shard:{i}` (binary shards) and `pema:{tenant}:mem:{address}:
manifest` (JSON, written last). Everything a tenant stores sits under `pema:{tenant}:`, so a Redis
ACL user per tenant limited to `~pema:{tenant}:*` (see `tenant_acl_rules`) cannot read another's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from redis.exceptions import NoPermissionError, RedisError

from proto.tls import read_pem
from tenant.memory_store import (
    DEFAULT_SHARD_PAIRS,
    CacheError,
    DiskMemoryStore,
    ShardedMemoryStore,
    check_tenant_id,
)

log = logging.getLogger(__name__)

FALLBACKS = ("disk", "fail")


def key_prefix(tenant: str) -> str:
    return f"pema:{check_tenant_id(tenant)}:"


def tenant_acl_rules(tenant: str, password: str) -> list[str]:
    """ACL SETUSER rules for a tenant: its own key prefix only, data commands only.

    SCAN/KEYS/RANDOMKEY are refused too: key patterns do not filter their results, and key names
    would tell one tenant which memories another has."""
    return [
        "reset",
        "on",
        f">{password}",
        f"~{key_prefix(tenant)}*",
        "resetchannels",
        "+@read",
        "+@write",
        "+@connection",
        "+@transaction",
        "-@dangerous",
        "-scan",
        "-randomkey",
    ]


class RedisMemoryStore(ShardedMemoryStore):
    """Shards and manifest as Redis strings with an optional TTL, written and read in pipelines."""

    def __init__(
        self,
        client: redis.Redis,
        ttl_seconds: int | None = None,
        shard_pairs: int = DEFAULT_SHARD_PAIRS,
    ) -> None:
        super().__init__(shard_pairs)
        self.client = client
        self.ttl = ttl_seconds

    @classmethod
    def connect(
        cls,
        url: str,
        ttl_seconds: int | None = None,
        shard_pairs: int = DEFAULT_SHARD_PAIRS,
        tls_ca: Path | None = None,
    ) -> RedisMemoryStore:
        """Connect and check the server answers; raises CacheError with the reason if not.

        A `rediss://` URL speaks TLS and verifies the server's certificate (hostname included)
        against `tls_ca`, else the system's CAs."""
        options: dict[str, Any] = {}
        if tls_ca is not None:
            if not url.startswith("rediss://"):
                raise CacheError(f"a Redis TLS CA needs a rediss:// URL, got {_safe(url)}")
            read_pem(tls_ca, "Redis CA certificate")  # a wrong path: one line, now
            options["ssl_ca_certs"] = str(tls_ca)
        try:
            client = redis.Redis.from_url(
                url, socket_connect_timeout=3, socket_timeout=60, **options
            )
        except ValueError as e:
            raise CacheError(f"Redis URL {_safe(url)}: {e}") from None
        try:
            client.ping()
        except RedisError as e:
            raise CacheError(f"Redis memory cache at {_safe(url)} is unavailable: {e}") from None
        return cls(client, ttl_seconds, shard_pairs)

    def _key(self, tenant: str, address: str, name: str) -> str:
        return f"{key_prefix(tenant)}mem:{address}:{name}"

    def _read(self, tenant: str, address: str, names: Sequence[str]) -> list[bytes | None]:
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.get(self._key(tenant, address, name))
                return list(pipe.execute())
        except RedisError as e:
            raise _cache_error("read", tenant, e) from None

    def _write(self, tenant: str, address: str, blobs: Sequence[tuple[str, bytes]]) -> None:
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for name, blob in blobs:
                    pipe.set(self._key(tenant, address, name), blob, ex=self.ttl)
                pipe.execute()
        except RedisError as e:
            raise _cache_error("write", tenant, e) from None

    def _delete(self, tenant: str, address: str, names: Sequence[str]) -> None:
        try:
            self.client.delete(*(self._key(tenant, address, n) for n in names))
        except RedisError as e:
            raise _cache_error("delete", tenant, e) from None

    def _touch(self, tenant: str, address: str, names: Sequence[str]) -> None:
        if self.ttl is None:
            return
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.expire(self._key(tenant, address, name), self.ttl)
                pipe.execute()
        except RedisError as e:
            raise _cache_error("expiry refresh", tenant, e) from None


def _cache_error(op: str, tenant: str, e: RedisError) -> CacheError:
    if isinstance(e, NoPermissionError):
        return CacheError(
            f"Redis memory cache {op} refused (NOPERM): these credentials may not access the keys "
            f"of tenant {tenant!r} ({e})"
        )
    return CacheError(f"Redis memory cache {op} failed: {e}")


def _safe(url: str) -> str:
    """The URL without its password, fit for messages and logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def open_memory_store(
    redis_url: str | None,
    disk_root: Path,
    fallback: str = "disk",
    ttl_seconds: int | None = None,
    shard_pairs: int = DEFAULT_SHARD_PAIRS,
    redis_tls_ca: Path | None = None,
) -> ShardedMemoryStore:
    """Redis when a URL is given and it answers; otherwise the on-disk cache, or (with fallback
    "fail") a CacheError naming the unreachable server."""
    if fallback not in FALLBACKS:
        raise CacheError(f"cache fallback must be one of {FALLBACKS}, got {fallback!r}")
    if redis_url:
        try:
            return RedisMemoryStore.connect(redis_url, ttl_seconds, shard_pairs, redis_tls_ca)
        except CacheError as e:
            if fallback == "fail":
                raise
            log.warning("%s; using the on-disk cache in %s", e, disk_root)
    return DiskMemoryStore(disk_root, shard_pairs)
