"""Memory caches: one shard mechanism, two storage backends (a folder here, Redis in redis_store).

A memory is stored as shards of `shard_pairs` consecutive pairs plus a manifest naming them.
Every shard carries its own header (spec address, pair range, dtype and shape) and a sha256 of
its bytes, so a shard left behind by an interrupted build can be verified and reused; the manifest
(spec, shard list with checksums) is written last, so a reader finds either a whole memory or none.
A missing, evicted or corrupt shard makes the memory absent: it is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pema.errors import MemoryFormatError, PemaError
from pema.memory import Memory, MemorySpec

DEFAULT_SHARD_PAIRS = 256
MANIFEST = "manifest"
SHARD_MAGIC = b"PEMASHD1"
FORMAT_VERSION = 1
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
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


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def encode_shard(
    address: str, index: int, first_pair: int, part: Memory
) -> tuple[bytes, ShardInfo]:
    """Header + keys + int32 targets + int64 local offsets, then a sha256 of all of it."""
    dtype = str(part.keys.dtype).removeprefix("torch.")
    header = {
        "version": FORMAT_VERSION,
        "address": address,
        "index": index,
        "first_pair": first_pair,
        "pairs": part.n_pairs,
        "dtype": dtype,
        "shape": list(part.keys.shape),
    }
    head = json.dumps(header, sort_keys=True).encode()
    body = b"".join(
        [
            SHARD_MAGIC,
            struct.pack("<I", len(head)),
            head,
            _bytes(part.keys),
            _bytes(part.targets.to(torch.int32)),
            _bytes(part.offsets.to(torch.int64)),
        ]
    )
    digest = hashlib.sha256(body).digest()
    info = ShardInfo(index, first_pair, part.n_pairs, len(part), dtype, digest.hex())
    return body + digest, info


def decode_shard(blob: bytes, spec: MemorySpec) -> tuple[Memory, ShardInfo]:
    """Parse and verify a shard; raises MemoryFormatError on any mismatch or damage."""
    if len(blob) < len(SHARD_MAGIC) + 4 + 32 or not blob.startswith(SHARD_MAGIC):
        raise MemoryFormatError("not a memory shard")
    body, digest = blob[:-32], blob[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise MemoryFormatError("shard checksum mismatch (corrupt)")
    pos = len(SHARD_MAGIC)
    (head_len,) = struct.unpack_from("<I", body, pos)
    pos += 4
    try:
        header = json.loads(body[pos : pos + head_len])
        dtype = _DTYPES[header["dtype"]]
        rows, width = header["shape"]
        pairs = int(header["pairs"])
    except (ValueError, KeyError, TypeError) as e:
        raise MemoryFormatError(f"unreadable shard header ({e})") from None
    if header.get("version") != FORMAT_VERSION or header.get("address") != spec.address:
        raise MemoryFormatError("shard belongs to another memory or format version")
    pos += head_len
    sizes = [rows * width * dtype.itemsize, rows * 4, (pairs + 1) * 8]
    if pos + sum(sizes) != len(body):
        raise MemoryFormatError("shard size does not match its header")
    raw = bytearray(body[pos:])  # one writable copy; tensors below are views into it
    keys = torch.frombuffer(raw, dtype=dtype, count=rows * width).view(rows, width)
    targets = torch.frombuffer(raw, dtype=torch.int32, count=rows, offset=sizes[0])
    offsets = torch.frombuffer(raw, dtype=torch.int64, count=pairs + 1, offset=sizes[0] + sizes[1])
    info = ShardInfo(
        int(header["index"]), int(header["first_pair"]), pairs, rows, header["dtype"], digest.hex()
    )
    return Memory(spec, keys, targets, offsets), info


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
        manifest = {
            "version": FORMAT_VERSION,
            "spec": asdict(spec),
            "pairs": sum(s.pairs for s in shards),
            "shard_pairs": self.shard_pairs,
            "shards": [asdict(s) for s in shards],
        }
        self._write(tenant, spec.address, [(MANIFEST, json.dumps(manifest).encode())])


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
