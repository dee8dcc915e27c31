"""Memory caches: one shard mechanism, two storage backends (a folder here, Redis in redis_store).

A memory is stored as shards of `shard_pairs` consecutive pairs plus a manifest naming them.
Every shard is a safetensors blob (keys, targets, offsets) whose metadata holds the memory's spec,
its pair range and a fingerprint of its arrays, so a shard left behind by an interrupted build can
be verified and reused; the manifest (readable JSON: what the memory was built from, its shards
with their sha256) is written last, so a reader finds either a whole memory or none. A missing,
evicted or corrupt shard makes the memory absent: it is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from pema.errors import MemoryFormatError, PemaError
from pema.memory import Memory, MemorySpec

DEFAULT_SHARD_PAIRS = 256
MANIFEST = "manifest"
# 2: safetensors shards (1 was a hand-written binary layout; its memories are rebuilt).
FORMAT_VERSION = 2
# Tenant ids end up in Redis ACL key patterns and file paths (no glob characters, no separators);
# the same rule as the coordinator's tenant registry.
TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class CacheError(PemaError):
    """The memory cache cannot be reached or refused an operation."""


def check_tenant_id(tenant: str) -> str:
    if not TENANT_ID.match(tenant):
        raise PemaError(
            f"tenant id {tenant!r} must be 1-63 lowercase letters, digits, '-' or '_' (starting alphanumeric)"
        )
    return tenant


def shard_name(index: int) -> str:
    return f"shard:{index}"


@dataclass(frozen=True)
class ShardInfo:
    index: int
    first_pair: int
    pairs: int
    keys: int
    dtype: str
    sha256: str


def encode_shard(
    address: str, index: int, first_pair: int, part: Memory
) -> tuple[bytes, ShardInfo]:
    """A safetensors blob of the part's arrays, its place in the memory in the metadata."""
    metadata = {
        "format_version": str(FORMAT_VERSION),
        "address": address,
        "index": str(index),
        "first_pair": str(first_pair),
        "fingerprint": part.fingerprint(),
    }
    tensors = {
        "keys": part.keys.contiguous(),
        "targets": part.targets.contiguous(),
        "offsets": part.offsets.contiguous(),
    }
    blob = save_tensors(tensors, metadata=metadata)
    dtype = str(part.keys.dtype).removeprefix("torch.")
    info = ShardInfo(
        index, first_pair, part.n_pairs, len(part), dtype, hashlib.sha256(blob).hexdigest()
    )
    return blob, info


def _metadata(blob: bytes) -> dict[str, str]:
    """The safetensors header's metadata (the format: an 8-byte little-endian length, then JSON);
    the library reads it only from files."""
    size = int.from_bytes(blob[:8], "little")
    if len(blob) < 8 + size:
        raise MemoryFormatError("not a memory shard")
    meta = json.loads(blob[8 : 8 + size]).get("__metadata__")
    if not isinstance(meta, dict):
        raise MemoryFormatError("not a memory shard (no metadata)")
    return meta


def decode_shard(blob: bytes, spec: MemorySpec) -> tuple[Memory, ShardInfo]:
    """Parse and verify a shard; raises MemoryFormatError on any mismatch or damage."""
    try:
        meta = _metadata(blob)
        tensors = load_tensors(blob)
        if meta.get("format_version") != str(FORMAT_VERSION) or meta.get("address") != spec.address:
            raise MemoryFormatError("shard belongs to another memory or format version")
        part = Memory(spec, tensors["keys"], tensors["targets"], tensors["offsets"])
        index, first_pair = int(meta["index"]), int(meta["first_pair"])
    except (ValueError, KeyError, TypeError, SafetensorError) as e:
        raise MemoryFormatError(f"unreadable shard ({e})") from None
    if part.fingerprint() != meta.get("fingerprint"):
        raise MemoryFormatError("shard content does not match its fingerprint (corrupt)")
    dtype = str(part.keys.dtype).removeprefix("torch.")
    info = ShardInfo(
        index, first_pair, part.n_pairs, len(part), dtype, hashlib.sha256(blob).hexdigest()
    )
    return part, info


def concat_memories(spec: MemorySpec, parts: Sequence[Memory]) -> Memory:
    """Join shards in pair order; keys widen to fp32 when any shard needed it."""
    dtype = torch.float16 if all(p.keys.dtype == torch.float16 for p in parts) else torch.float32
    keys = torch.cat([p.keys.to(dtype) for p in parts])
    targets = torch.cat([p.targets for p in parts])
    lengths = torch.cat([p.offsets[1:] - p.offsets[:-1] for p in parts])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return Memory(spec, keys, targets, offsets)


def _reusable(
    blob: bytes | None, spec: MemorySpec, first_pair: int, pairs: int
) -> tuple[Memory, ShardInfo] | None:
    """A shard left by an earlier build, if intact and covering exactly these pairs."""
    if blob is None:
        return None
    try:
        part, info = decode_shard(blob, spec)
    except MemoryFormatError:
        return None
    # A shard written with another shard size covers other pairs.
    return (part, info) if (info.first_pair, info.pairs) == (first_pair, pairs) else None


class ShardedMemoryStore(ABC):
    """get/put of whole memories and a resumable shard-wise build over named blobs.

    Subclasses only move bytes: `_read`, `_write`, `_delete` and `_touch` on the
    blobs `manifest` and `shard:{i}` of one (tenant, address)."""

    def __init__(self, shard_pairs: int = DEFAULT_SHARD_PAIRS) -> None:
        if shard_pairs < 1:
            raise PemaError(f"shard_pairs must be at least 1, got {shard_pairs}")
        self.shard_pairs = shard_pairs

    @abstractmethod
    def _read(self, tenant: str, address: str, names: Sequence[str]) -> list[bytes | None]: ...

    @abstractmethod
    def _write(self, tenant: str, address: str, blobs: Sequence[tuple[str, bytes]]) -> None: ...

    @abstractmethod
    def _delete(self, tenant: str, address: str, names: Sequence[str]) -> None: ...

    @abstractmethod
    def _touch(self, tenant: str, address: str, names: Sequence[str]) -> None:
        """Keep a memory that is in use alive where blobs expire."""

    def get(self, tenant: str, spec: MemorySpec) -> Memory | None:
        """The whole memory, or None if it is absent or any part of it is missing or damaged."""
        check_tenant_id(tenant)
        (raw,) = self._read(tenant, spec.address, [MANIFEST])
        if raw is None:
            return None
        try:
            manifest = json.loads(raw)
            if manifest["spec"] != asdict(spec) or manifest["version"] != FORMAT_VERSION:
                raise MemoryFormatError("manifest is for another memory")
            listed = [ShardInfo(**s) for s in manifest["shards"]]
        except (ValueError, KeyError, TypeError, MemoryFormatError):
            self._delete(tenant, spec.address, [MANIFEST])
            return None
        names = [shard_name(s.index) for s in listed]
        parts: list[Memory] = []
        bad: list[str] = []
        for name, want, blob in zip(
            names, listed, self._read(tenant, spec.address, names), strict=True
        ):
            if blob is None:
                bad.append(name)
                continue
            try:
                part, info = decode_shard(blob, spec)
            except MemoryFormatError:
                bad.append(name)
                continue
            if info != want:
                bad.append(name)
                continue
            parts.append(part)
        if bad or not parts:
            # Dropping the manifest makes the memory absent; intact shards stay for the rebuild.
            self._delete(tenant, spec.address, [MANIFEST, *bad])
            return None
        self._touch(tenant, spec.address, [MANIFEST, *names])
        return concat_memories(spec, parts)

    def put(self, tenant: str, memory: Memory) -> None:
        """Store a whole memory: all shards, then the manifest."""
        n = memory.n_pairs
        starts = range(0, n, self.shard_pairs)
        blobs, infos = [], []
        for index, start in enumerate(starts):
            part = memory.split_pairs(range(start, min(start + self.shard_pairs, n)))
            blob, info = encode_shard(memory.spec.address, index, start, part)
            blobs.append((shard_name(index), blob))
            infos.append(info)
        self._write(tenant, memory.spec.address, blobs)
        self._commit(tenant, memory.spec, infos)

    def build(
        self, tenant: str, spec: MemorySpec, n_pairs: int, build_part: Callable[[int, int], Memory]
    ) -> Memory:
        """Build a memory shard by shard, storing each as it completes and reusing intact shards
        a previous (interrupted) build left behind; `build_part(start, end)` encodes those pairs."""
        check_tenant_id(tenant)
        starts = list(range(0, n_pairs, self.shard_pairs))
        names = [shard_name(i) for i in range(len(starts))]
        existing = self._read(tenant, spec.address, names)
        parts: list[Memory] = []
        infos: list[ShardInfo] = []
        for index, (start, blob) in enumerate(zip(starts, existing, strict=True)):
            end = min(start + self.shard_pairs, n_pairs)
            found = _reusable(blob, spec, start, end - start)
            if found is None:
                part = build_part(start, end)
                blob, info = encode_shard(spec.address, index, start, part)
                self._write(tenant, spec.address, [(names[index], blob)])
            else:
                part, info = found
            parts.append(part)
            infos.append(info)
        self._commit(tenant, spec, infos)
        return concat_memories(spec, parts)

    def _commit(self, tenant: str, spec: MemorySpec, shards: Sequence[ShardInfo]) -> None:
        # Readable JSON: `pema-tenant cache list` and an operator's `cat` see what it was built from.
        manifest = {
            "version": FORMAT_VERSION,
            "tenant": tenant,
            "address": spec.address,
            "spec": asdict(spec),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "pairs": sum(s.pairs for s in shards),
            "keys": sum(s.keys for s in shards),
            "shard_pairs": self.shard_pairs,
            "shards": [asdict(s) for s in shards],
        }
        blob = json.dumps(manifest, indent=1, ensure_ascii=False).encode()
        self._write(tenant, spec.address, [(MANIFEST, blob)])

    # -- inventory (pema-tenant cache list|clear) ----------------------------------------------

    @abstractmethod
    def _memories(self, tenant: str | None) -> dict[tuple[str, str], dict[str, int]]:
        """Every stored (tenant, address), with its blobs' names and sizes in bytes."""

    @abstractmethod
    def _drop(self, tenant: str, address: str, names: Sequence[str]) -> None:
        """Delete these blobs of one memory, and whatever holds them when it is left empty."""

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the store lives, for listings (a folder, a Redis URL without its password)."""

    def entries(self, tenant: str | None = None) -> list[CacheEntry]:
        """Every stored memory, whole or partial (a build that did not finish)."""
        out = []
        for (t, address), blobs in sorted(self._memories(tenant).items()):
            (raw,) = self._read(t, address, [MANIFEST]) if MANIFEST in blobs else (None,)
            try:
                manifest = json.loads(raw) if raw is not None else {}
            except ValueError:
                manifest = {}
            out.append(
                CacheEntry(
                    location=self.location,
                    tenant=t,
                    address=address,
                    complete=bool(manifest),
                    bytes=sum(blobs.values()),
                    shards=sum(1 for n in blobs if n != MANIFEST),
                    pairs=manifest.get("pairs"),
                    keys=manifest.get("keys"),
                    built_at=manifest.get("built_at"),
                    spec=manifest.get("spec"),
                )
            )
        return out

    def clear(self, tenant: str | None = None, address: str | None = None) -> list[CacheEntry]:
        """Delete every memory (of one tenant, or one address); returns what was deleted."""
        if tenant is not None:
            check_tenant_id(tenant)
        gone = [e for e in self.entries(tenant) if address is None or e.address == address]
        blobs = self._memories(tenant)
        for e in gone:
            self._drop(e.tenant, e.address, list(blobs[(e.tenant, e.address)]))
        return gone


@dataclass(frozen=True)
class CacheEntry:
    location: str
    tenant: str
    address: str
    complete: bool  # False: shards of an interrupted build, no manifest yet
    bytes: int
    shards: int
    pairs: int | None
    keys: int | None
    built_at: str | None
    spec: dict[str, Any] | None  # what it was built from: model revision, data, template, mode


class DiskMemoryStore(ShardedMemoryStore):
    """The embedded default: {root}/{tenant}/{address}/manifest and shard-{i}, written atomically."""

    def __init__(self, root: Path, shard_pairs: int = DEFAULT_SHARD_PAIRS) -> None:
        super().__init__(shard_pairs)
        self.root = root

    def _path(self, tenant: str, address: str, name: str) -> Path:
        return self.root / tenant / address / name.replace(":", "-")

    def _read(self, tenant: str, address: str, names: Sequence[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for name in names:
            try:
                out.append(self._path(tenant, address, name).read_bytes())
            except FileNotFoundError:
                out.append(None)
        return out

    def _write(self, tenant: str, address: str, blobs: Sequence[tuple[str, bytes]]) -> None:
        for name, blob in blobs:
            path = self._path(tenant, address, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(blob)
            os.replace(tmp, path)  # a reader sees the old blob or the whole new one

    def _delete(self, tenant: str, address: str, names: Sequence[str]) -> None:
        for name in names:
            self._path(tenant, address, name).unlink(missing_ok=True)

    def _touch(self, tenant: str, address: str, names: Sequence[str]) -> None:
        """Files do not expire."""

    @property
    def location(self) -> str:
        return str(self.root)

    def _memories(self, tenant: str | None) -> dict[tuple[str, str], dict[str, int]]:
        found: dict[tuple[str, str], dict[str, int]] = {}
        tenants = [self.root / tenant] if tenant else sorted(self.root.glob("*"))
        for tdir in tenants:
            if not tdir.is_dir() or not TENANT_ID.match(tdir.name):
                continue
            for mdir in sorted(tdir.iterdir()):
                if mdir.is_dir():
                    found[(tdir.name, mdir.name)] = {
                        f.name.replace("-", ":", 1): f.stat().st_size
                        for f in mdir.iterdir()
                        if f.is_file() and not f.name.startswith(".")
                    }
        return found

    def _drop(self, tenant: str, address: str, names: Sequence[str]) -> None:
        folder = self.root / tenant / address
        shutil.rmtree(folder, ignore_errors=True)
        if folder.parent.is_dir() and not any(folder.parent.iterdir()):
            folder.parent.rmdir()
