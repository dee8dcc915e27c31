"""`pema-tenant adapters …` and `pema-tenant cache …`: what is stored on this machine (and in
Redis), how large it is, what it was built from, and deleting it."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors import safe_open
from tabulate import tabulate

from pema.adapter import adapter_files, read_adapter_document
from pema.errors import AdapterError
from tenant.memory_store import CacheEntry, DiskMemoryStore, ShardedMemoryStore


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def find_adapters(roots: Sequence[Path], depth: int = 3) -> Iterator[Path]:
    """Adapter folders at or below each root (a few levels: runs/<tenant>/<adapter>)."""
    seen: set[Path] = set()
    for root in roots:
        if not root.is_dir():
            raise AdapterError(f"{root}: no such folder")
        level = [root]
        for _ in range(depth + 1):
            following = []
            for folder in level:
                if folder.resolve() in seen:
                    continue
                seen.add(folder.resolve())
                if adapter_files(folder) is not None:
                    yield folder
                else:
                    following += sorted(
                        p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                    )
            level = following


def _summary(path: Path) -> dict[str, Any]:
    doc, config, weights = read_adapter_document(path)
    training = doc.get("training", {})
    return {
        "adapter": str(path),
        "format": doc.get("format_version", 1),
        "model": training.get("model", ""),
        "revision": config.model_revision,
        "rank": config.rank,
        "mixing": f"{config.schedule} {config.lambda_max}",
        "pairs": training.get("train_pairs", ""),
        "size": human_size(folder_size(path)),
        "saved": time.strftime("%Y-%m-%d %H:%M", time.localtime(weights.stat().st_mtime)),
    }


def list_adapters(roots: Sequence[Path]) -> str:
    rows = [_summary(p) for p in find_adapters(roots)]
    if not rows:
        return f"no adapters under {', '.join(map(str, roots))}"
    return tabulate(rows, headers="keys")


def show_adapter(path: Path) -> str:
    doc, _, weights = read_adapter_document(path)
    with safe_open(str(weights), "numpy") as f:
        tensors = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        metadata = f.metadata() or {}
    shown = {**_summary(path), "weights_metadata": metadata, "tensors": tensors, "config": doc}
    return json.dumps(shown, indent=2, ensure_ascii=False)


def delete_adapters(paths: Sequence[Path]) -> list[str]:
    """Delete adapter folders; refuses (before deleting any) a folder that holds no adapter."""
    for p in paths:
        if adapter_files(p) is None:
            raise AdapterError(f"{p}: not an adapter folder; nothing deleted")
    out = []
    for p in paths:
        size = folder_size(p)
        shutil.rmtree(p)
        out.append(f"deleted {p} ({human_size(size)})")
    return out


def cache_stores(root: Path, redis_url: str | None) -> list[ShardedMemoryStore]:
    """The on-disk memory cache, and the Redis one when a URL is given (which must answer)."""
    stores: list[ShardedMemoryStore] = [DiskMemoryStore(root / "memories")]
    if redis_url:
        from tenant.redis_store import RedisMemoryStore

        stores.append(RedisMemoryStore.connect(redis_url))
    return stores


def _row(e: CacheEntry) -> dict[str, Any]:
    spec = e.spec or {}
    return {
        "store": e.location,
        "tenant": e.tenant,
        "address": e.address,
        "state": "complete" if e.complete else "partial",
        "pairs": e.pairs if e.pairs is not None else "",
        "keys": e.keys if e.keys is not None else "",
        "size": human_size(e.bytes),
        "mode": spec.get("mode", ""),
        "revision": str(spec.get("model_revision", ""))[:12],
        "data": str(spec.get("dataset_fingerprint", ""))[:12],
        "built": e.built_at or "",
    }


def list_cache(stores: Sequence[ShardedMemoryStore], tenant: str | None, as_json: bool) -> str:
    entries = [e for s in stores for e in s.entries(tenant)]
    if as_json:
        return "\n".join(json.dumps(asdict(e), ensure_ascii=False) for e in entries)
    if not entries:
        return f"no cached memories in {', '.join(s.location for s in stores)}"
    total = human_size(sum(e.bytes for e in entries))
    return (
        f"{tabulate([_row(e) for e in entries], headers='keys')}\n{len(entries)} memories, {total}"
    )


def clear_cache(
    stores: Sequence[ShardedMemoryStore], tenant: str | None, address: str | None
) -> str:
    gone = [e for s in stores for e in s.clear(tenant, address)]
    size = human_size(sum(e.bytes for e in gone))
    return f"deleted {len(gone)} cached memories ({size})"
