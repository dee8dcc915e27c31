"""The Redis memory cache against the real Redis at 127.0.0.1:6379 (and the disk cache, which
shares its shard mechanism). Every test uses its own tenant ids and deletes its keys and users."""

from __future__ import annotations

import json
import secrets
import socket
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import redis
import torch
from prometheus_client.parser import text_string_to_metric_families
from redis.exceptions import NoPermissionError
from tiny_model import KJV, save_tiny_model

from pema.backbone import Backbone, Encoded, EncodeItem, MemoryMode
from pema.data import Pair, read_pairs
from pema.memory import Memory
from pema.prompts import PromptFormat
from tenant.backend import Backend, coordinator_backend, local_backend
from tenant.demo import Processes, start_coordinator
from tenant.jobs import MemoryResult, obtain_memory
from tenant.memory_store import CacheError, DiskMemoryStore, ShardedMemoryStore
from tenant.redis_store import (
    STORE_COMMANDS,
    RedisMemoryStore,
    open_memory_store,
    tenant_acl_rules,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
SHARD_PAIRS = 8
N_PAIRS = 30  # 4 shards: 8 + 8 + 8 + 6


class CountingBackbone:
    """Counts encode calls (and pairs encoded); can fail after a number of calls."""

    def __init__(self, inner: Backbone, fail_after: int | None = None) -> None:
        self.inner = inner
        self.info = inner.info
        self.calls = 0
        self.items = 0
        self.fail_after = fail_after

    def head(self):  # type: ignore[no-untyped-def]
        return self.inner.head()

    def session(self):  # type: ignore[no-untyped-def]
        return self.inner.session()

    def encode(
        self,
        items: Sequence[EncodeItem],
        mode: MemoryMode,
        progress: Callable[[int], None] | None = None,
    ) -> list[Encoded]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.items += len(items)
        return self.inner.encode(items, mode, progress)


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Backend:
    model = save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    return local_backend(model, torch.float32)


@pytest.fixture(scope="module")
def pairs() -> list[Pair]:
    return read_pairs(KJV / "train.tsv", N_PAIRS)


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(REDIS_URL)
    try:
        c.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip("no Redis at 127.0.0.1:6379")
    yield c
    c.close()


@pytest.fixture
def tenant(client: redis.Redis) -> Iterator[str]:
    """A unique tenant id; its keys are deleted afterwards."""
    name = f"t{uuid.uuid4().hex[:12]}"
    yield name
    keys = list(client.scan_iter(match=f"pema:{name}:*"))
    if keys:
        client.delete(*keys)


def run(
    backend: Backend,
    pairs: list[Pair],
    store: ShardedMemoryStore | None,
    tenant: str,
    fail_after: int | None = None,
) -> tuple[MemoryResult, CountingBackbone]:
    counting = CountingBackbone(backend.backbone, fail_after)
    counted = Backend(counting, backend.tokenizer)
    fmt = PromptFormat(backend.tokenizer)
    result = obtain_memory(
        counted, fmt, pairs, MemoryMode.TEACHER_FORCED, store, tenant, quiet=True
    )
    return result, counting


def same(a: Memory, b: Memory) -> bool:
    return (
        a.spec == b.spec
        and torch.equal(a.keys, b.keys)
        and torch.equal(a.targets, b.targets)
        and torch.equal(a.offsets, b.offsets)
    )


def test_round_trip_layout_and_ttl(
    backend: Backend, pairs: list[Pair], client: redis.Redis, tenant: str
) -> None:
    fresh, _ = run(backend, pairs, None, tenant)
    store = RedisMemoryStore.connect(REDIS_URL, ttl_seconds=600, shard_pairs=SHARD_PAIRS)
    store.put(tenant, fresh.memory)
    got = store.get(tenant, fresh.memory.spec)
    assert got is not None and same(got, fresh.memory)
    assert got.keys.dtype == torch.float16
    prefix = f"pema:{tenant}:mem:{fresh.memory.spec.address}"
    keys = sorted(k.decode() for k in client.scan_iter(match=f"pema:{tenant}:*"))
    assert keys == sorted([f"{prefix}:manifest"] + [f"{prefix}:shard:{i}" for i in range(4)])
    assert all(0 < client.ttl(k) <= 600 for k in keys)


def test_disk_round_trip(backend: Backend, pairs: list[Pair], tmp_path: Path) -> None:
    fresh, _ = run(backend, pairs, None, "local")
    store = DiskMemoryStore(tmp_path, SHARD_PAIRS)
    store.put("local", fresh.memory)
    got = store.get("local", fresh.memory.spec)
    assert got is not None and same(got, fresh.memory)


def test_second_run_is_a_cache_hit_without_encoding(
    backend: Backend, pairs: list[Pair], tenant: str
) -> None:
    store = RedisMemoryStore.connect(REDIS_URL, shard_pairs=SHARD_PAIRS)
    first, c1 = run(backend, pairs, store, tenant)
    assert not first.cache_hit and c1.calls == 4 and c1.items == N_PAIRS
    second, c2 = run(backend, pairs, store, tenant)
    assert second.cache_hit and c2.calls == 0
    assert same(first.memory, second.memory)


def encode_calls(metrics_url: str, tenant: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        text = r.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "pema_coordinator_requests_total"
        and sample.labels.get("method") == "Encode"
        and sample.labels.get("tenant") == tenant
    )


def test_second_run_does_not_call_the_coordinators_encode(
    tmp_path: Path, pairs: list[Pair], tenant: str
) -> None:
    """Through a real coordinator process: its request counter proves the cache hit."""
    model = save_tiny_model(tmp_path / "model")
    token = secrets.token_hex(8)
    procs = Processes(tmp_path / "logs")
    try:
        address, metrics_url = start_coordinator(procs, model, {tenant: token}, tmp_path)
        backend = coordinator_backend(address, token)
        store = RedisMemoryStore.connect(REDIS_URL, shard_pairs=SHARD_PAIRS)
        fmt = PromptFormat(backend.tokenizer)
        first = obtain_memory(
            backend, fmt, pairs, MemoryMode.TEACHER_FORCED, store, tenant, quiet=True
        )
        after_first = encode_calls(metrics_url, tenant)
        assert not first.cache_hit and after_first >= 4  # at least one call per shard
        second = obtain_memory(
            backend, fmt, pairs, MemoryMode.TEACHER_FORCED, store, tenant, quiet=True
        )
        assert second.cache_hit and same(first.memory, second.memory)
        assert encode_calls(metrics_url, tenant) == after_first
    finally:
        procs.stop_all()


@pytest.mark.parametrize("kind", ["redis", "disk"])
def test_interrupted_build_resumes(
    backend: Backend, pairs: list[Pair], tenant: str, tmp_path: Path, kind: str
) -> None:
    store: ShardedMemoryStore = (
        RedisMemoryStore.connect(REDIS_URL, shard_pairs=SHARD_PAIRS)
        if kind == "redis"
        else DiskMemoryStore(tmp_path / "cache", SHARD_PAIRS)
    )
    # Batching changes float rounding, so the reference is an uninterrupted build in equal shards.
    fresh, _ = run(backend, pairs, DiskMemoryStore(tmp_path / "ref", SHARD_PAIRS), tenant)
    with pytest.raises(KeyboardInterrupt):
        run(backend, pairs, store, tenant, fail_after=2)
    # Two shards are stored, but without a manifest a reader sees no memory at all.
    assert store.get(tenant, fresh.memory.spec) is None
    resumed, counting = run(backend, pairs, store, tenant)
    assert not resumed.cache_hit
    assert counting.calls == 2 and counting.items == N_PAIRS - 2 * SHARD_PAIRS
    assert same(resumed.memory, fresh.memory)
    assert run(backend, pairs, store, tenant)[0].cache_hit


@pytest.mark.parametrize("damage", ["corrupt", "evicted"])
def test_damaged_shard_is_rebuilt_not_used(
    backend: Backend, pairs: list[Pair], client: redis.Redis, tenant: str, damage: str
) -> None:
    store = RedisMemoryStore.connect(REDIS_URL, shard_pairs=SHARD_PAIRS)
    first, _ = run(backend, pairs, store, tenant)
    key = f"pema:{tenant}:mem:{first.memory.spec.address}:shard:1"
    if damage == "corrupt":
        blob = bytearray(client.get(key) or b"")
        blob[len(blob) // 2] ^= 0xFF  # one flipped byte inside the keys
        client.set(key, bytes(blob))
    else:
        client.delete(key)
    assert store.get(tenant, first.memory.spec) is None
    again, counting = run(backend, pairs, store, tenant)
    assert not again.cache_hit
    assert counting.calls == 1 and counting.items == SHARD_PAIRS  # only shard 1 re-encoded
    assert same(again.memory, first.memory)


def test_acl_isolates_tenants(backend: Backend, pairs: list[Pair], client: redis.Redis) -> None:
    tenants = [f"a{uuid.uuid4().hex[:10]}", f"b{uuid.uuid4().hex[:10]}"]
    users = {t: f"pema-test-{t}" for t in tenants}
    passwords = {t: secrets.token_hex(16) for t in tenants}
    try:
        for t in tenants:
            client.execute_command("ACL", "SETUSER", users[t], *tenant_acl_rules(t, passwords[t]))
        url = {t: f"redis://{users[t]}:{passwords[t]}@127.0.0.1:6379/0" for t in tenants}
        a, b = tenants
        store_b = RedisMemoryStore.connect(url[b], shard_pairs=SHARD_PAIRS)
        built, _ = run(backend, pairs, store_b, b)  # tenant B writes with its own credentials
        spec = built.memory.spec
        assert store_b.get(b, spec) is not None
        client_a = redis.Redis.from_url(url[a])
        with pytest.raises(NoPermissionError):
            client_a.get(f"pema:{b}:mem:{spec.address}:manifest")
        with pytest.raises(NoPermissionError):
            client_a.scan(match=f"pema:{b}:*")
        store_a = RedisMemoryStore(client_a, shard_pairs=SHARD_PAIRS)
        with pytest.raises(CacheError, match="NOPERM"):
            store_a.get(b, spec)
        client_a.set(f"pema:{a}:probe", b"ok")  # its own prefix works
        assert client_a.get(f"pema:{a}:probe") == b"ok"
        client_a.close()
    finally:
        for t in tenants:
            client.execute_command("ACL", "DELUSER", users[t])
            keys = list(client.scan_iter(match=f"pema:{t}:*"))
            if keys:
                client.delete(*keys)


def _commands(client: redis.Redis) -> Iterator[tuple[str, int, bool, bool]]:
    """(name, arity, takes keys, needs no auth) for every command and subcommand of the server."""
    for name, info in client.command().items():
        yield (
            name,
            info["arity"],
            bool(info["key_specifications"]),
            "no_auth" in info["flags"],
        )
        for sub in info["subcommands"]:
            sub_name, arity, flags, *_ = sub
            key_specs = sub[8] if len(sub) > 8 else []
            yield sub_name.decode(), arity, bool(key_specs), b"no_auth" in flags


def test_acl_allows_exactly_the_store_commands(client: redis.Redis) -> None:
    """ACL DRYRUN of every command the server knows, with every argument another tenant's key,
    and with no key at all: only the store's commands pass, and none of them on B's key."""
    a, b = f"a{uuid.uuid4().hex[:10]}", f"b{uuid.uuid4().hex[:10]}"
    user = f"pema-test-{a}"
    client.execute_command("ACL", "SETUSER", user, *tenant_acl_rules(a, secrets.token_hex(16)))
    try:
        allowed: dict[str, set[str]] = {"other": set(), "none": set()}
        free: set[str] = set()  # AUTH, HELLO, QUIT, RESET: any connection may run them
        checked = 0
        for name, arity, has_keys, no_auth in _commands(client):
            words = name.split("|")
            missing = max(abs(arity) - len(words), 0)
            for kind, filler in (("other", f"pema:{b}:mem:x:manifest"), ("none", "1")):
                if kind == "none" and has_keys:
                    continue  # its argument would be a key named "1", outside A's prefix too
                args = [*words, *[filler] * missing]
                try:
                    reply = client.execute_command("ACL", "DRYRUN", user, *args)
                except redis.exceptions.ResponseError:
                    # Not a runnable command line (a container command without a valid
                    # subcommand); each subcommand is tried on its own.
                    continue
                checked += 1
                if reply in (b"OK", "OK"):
                    (free if no_auth else allowed[kind]).add(name)
        assert checked > 300  # every command of Redis 7 and its subcommands
        assert allowed["none"] <= set(STORE_COMMANDS), allowed["none"]
        # With B's key in every position, only commands without keys pass.
        assert allowed["other"] <= {"ping", "select"}, allowed["other"]
        assert free <= {"auth", "hello", "quit", "reset"}, free  # this connection only
        for refused in (
            "client|tracking",
            "function|flush",
            "function|delete",
            "dbsize",
            "pfmerge",
        ):
            assert refused not in allowed["none"] | allowed["other"]
        # The store's commands do work on A's own keys.
        own = f"pema:{a}:probe"
        for args in (
            ("get", own),
            ("set", own, "1", "EX", "5"),
            ("expire", own, "5"),
            ("del", own),
        ):
            assert client.execute_command("ACL", "DRYRUN", user, *args) in (b"OK", "OK"), args
    finally:
        client.execute_command("ACL", "DELUSER", user)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: nothing listens there


def test_redis_down_at_start(
    backend: Backend, pairs: list[Pair], client: redis.Redis, tenant: str, tmp_path: Path
) -> None:
    url = f"redis://127.0.0.1:{_dead_port()}/0"
    with pytest.raises(CacheError, match=r"Redis memory cache at redis://127\.0\.0\.1:\d+/0 is"):
        open_memory_store(url, tmp_path, fallback="fail")
    store = open_memory_store(url, tmp_path, fallback="disk", shard_pairs=SHARD_PAIRS)
    assert isinstance(store, DiskMemoryStore)
    first, _ = run(backend, pairs, store, tenant)
    assert run(backend, pairs, store, tenant)[0].cache_hit
    assert list(client.scan_iter(match=f"pema:{tenant}:*")) == []
    assert (tmp_path / tenant / first.memory.spec.address / "manifest").is_file()


def test_cache_list_and_clear_reach_redis(
    backend: Backend,
    pairs: list[Pair],
    tenant: str,
    client: redis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tenant.cli import main

    monkeypatch.setenv("PEMA_CACHE_DIR", str(tmp_path / "cache"))  # an empty disk cache
    store = RedisMemoryStore.connect(REDIS_URL, shard_pairs=SHARD_PAIRS)
    fresh, _ = run(backend, pairs, store, tenant)
    assert main(["cache", "list", "--redis-url", REDIS_URL, "--tenant", tenant, "--json"]) == 0
    (entry,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert entry["tenant"] == tenant and entry["complete"] and entry["pairs"] == N_PAIRS
    assert entry["address"] == fresh.memory.spec.address and entry["bytes"] > 0
    assert entry["location"].startswith("redis")
    assert main(["cache", "list", "--redis-url", REDIS_URL, "--tenant", tenant]) == 0
    assert "1 memories" in capsys.readouterr().out
    assert main(["cache", "clear", "--redis-url", REDIS_URL, "--tenant", tenant]) == 0
    assert "deleted 1 cached memories" in capsys.readouterr().out
    assert not list(client.scan_iter(match=f"pema:{tenant}:*"))
    # A Redis that does not answer is one line and exit 2, not a traceback.
    dead = f"redis://127.0.0.1:{_dead_port()}/0"
    assert main(["cache", "list", "--redis-url", dead]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
