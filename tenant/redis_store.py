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


# Exactly the commands RedisMemoryStore sends: GET, SET (with EX), EXPIRE and DEL on its own keys,
# PING from connect(), SELECT when the URL names a database other than 0 (AUTH and HELLO need no
# permission). No categories: @connection let one tenant watch another's key names with
# CLIENT TRACKING BCAST PREFIX, @write let it create keys in another's prefix with PFMERGE, and
# both grow with every Redis release. tests/integration/test_redis_store.py runs ACL DRYRUN for
# every command the server knows and fails on any allowed one outside this list.
STORE_COMMANDS = ("get", "set", "expire", "del", "ping", "select")


def tenant_acl_rules(tenant: str, password: str) -> list[str]:
    """ACL SETUSER rules for a tenant: its own key prefix, no channels, STORE_COMMANDS only."""
    return [
        "reset",
        "on",
        f">{password}",
        f"~{key_prefix(tenant)}*",
        "resetchannels",
        *(f"+{c}" for c in STORE_COMMANDS),
    ]


class RedisMemoryStore(ShardedMemoryStore):
    """Shards and manifest as Redis strings with an optional TTL, written and read in pipelines."""

    def __init__(
        self,
        client: redis.Redis,
        ttl_seconds: int | None = None,
        shard_pairs: int = DEFAULT_SHARD_PAIRS,
        url: str = "",
    ) -> None:
        super().__init__(shard_pairs)
        self.client = client
        self.ttl = ttl_seconds
        self.url = url

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
        return cls(client, ttl_seconds, shard_pairs, url)

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

    @property
    def location(self) -> str:
        return _safe(self.url) if self.url else "redis"

    def _memories(self, tenant: str | None) -> dict[tuple[str, str], dict[str, int]]:
        """SCAN for the memories' keys (an admin's credentials: tenant ACL users may not SCAN)."""
        pattern = f"{key_prefix(tenant) if tenant else 'pema:*:'}mem:*"
        try:
            keys = [k.decode() for k in self.client.scan_iter(match=pattern, count=1000)]
            with self.client.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.strlen(k)
                sizes = pipe.execute()
        except RedisError as e:
            raise _cache_error("listing", tenant or "*", e) from None
        found: dict[tuple[str, str], dict[str, int]] = {}
        for key, size in zip(keys, sizes, strict=True):
            # pema:{tenant}:mem:{address}:{manifest | shard:i}
            parts = key.split(":", 4)
            if len(parts) == 5 and parts[2] == "mem":
                found.setdefault((parts[1], parts[3]), {})[parts[4]] = int(size)
        return found

    def _drop(self, tenant: str, address: str, names: Sequence[str]) -> None:
        self._delete(tenant, address, names)


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
