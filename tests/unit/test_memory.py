"""The external memory: building, saving and loading, and refusing anything corrupt or foreign."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from pema.backbone import EncodeItem, FrozenLM, MemoryMode
from pema.errors import DataError, MemoryFormatError
from pema.memory import Memory, MemorySpec, build_memory, storage_dtype
from tenant.memory_store import DiskMemoryStore

SPEC = MemorySpec(
    model_revision="rev-1", dataset_fingerprint="data-1", template="T {source}", mode="free-running"
)


def _memory(spec: MemorySpec = SPEC, pairs: int = 6, d: int = 16, seed: int = 0) -> Memory:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (pairs,), generator=g)
    n = int(lengths.sum())
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    keys = (torch.randn(n, d, generator=g) * 10).half()
    targets = torch.randint(0, 1000, (n,), generator=g, dtype=torch.int32)
    return Memory(spec, keys, targets, offsets)


def _assert_same(a: Memory, b: Memory) -> None:
    assert a.spec == b.spec
    for x, y in ((a.keys, b.keys), (a.targets, b.targets), (a.offsets, b.offsets)):
        assert x.dtype == y.dtype
        assert torch.equal(x, y)


def _flip_tensor_bytes(path: Path, at: float = 0.5) -> None:
    """Flip a few bytes inside the tensor data of a safetensors file (its header stays valid)."""
    data = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    start = 8 + header_len
    pos = start + int((len(data) - start) * at)
    for i in range(pos, pos + 4):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_save_load_round_trip(tmp_path: Path) -> None:
    mem = _memory()
    path = tmp_path / "m.safetensors"
    mem.save(path)
    loaded = Memory.load(path, expect=SPEC)
    _assert_same(loaded, mem)
    assert loaded.fingerprint() == mem.fingerprint()
    assert len(loaded) == len(mem) and loaded.n_pairs == 6
    assert not list(tmp_path.glob("*.tmp"))


def test_fp32_keys_round_trip(tmp_path: Path) -> None:
    mem = _memory()
    mem = Memory(mem.spec, mem.keys.float() * 1e4, mem.targets, mem.offsets)
    mem.save(tmp_path / "m.safetensors")
    _assert_same(Memory.load(tmp_path / "m.safetensors"), mem)


@pytest.mark.parametrize("at", [0.0, 0.3, 0.99])
def test_corrupted_tensor_data_is_refused(tmp_path: Path, at: float) -> None:
    path = tmp_path / "m.safetensors"
    _memory().save(path)
    _flip_tensor_bytes(path, at)
    with pytest.raises(MemoryFormatError, match="corrupt"):
        Memory.load(path)


def test_truncated_or_garbage_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    _memory().save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(MemoryFormatError):
        Memory.load(path)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(MemoryFormatError):
        Memory.load(path)
    with pytest.raises(MemoryFormatError):
        Memory.load(tmp_path / "absent.safetensors")


def test_load_with_other_expected_spec_raises(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    _memory().save(path)
    for change in (
        {"model_revision": "rev-2"},
        {"dataset_fingerprint": "data-2"},
        {"template": "U {source}"},
        {"mode": "teacher-forced"},
    ):
        other = dataclasses.replace(SPEC, **change)
        assert other.address != SPEC.address
        with pytest.raises(MemoryFormatError):
            Memory.load(path, expect=other)


def test_inconsistent_arrays_are_refused() -> None:
    mem = _memory()
    with pytest.raises(MemoryFormatError):
        Memory(SPEC, mem.keys, mem.targets[:-1], mem.offsets)
    with pytest.raises(MemoryFormatError):
        Memory(SPEC, mem.keys, mem.targets, mem.offsets[:-1])


def test_split_pairs_keeps_each_pairs_rows() -> None:
    mem = _memory(pairs=5)
    sub = mem.split_pairs([3, 1])
    o = mem.offsets
    expected_rows = list(range(int(o[3]), int(o[4]))) + list(range(int(o[1]), int(o[2])))
    assert torch.equal(sub.keys, mem.keys[expected_rows])
    assert torch.equal(sub.targets, mem.targets[expected_rows])
    assert sub.n_pairs == 2


def test_storage_dtype_falls_back_beyond_fp16_range() -> None:
    assert storage_dtype(2700.0) == torch.float16
    assert storage_dtype(70000.0) == torch.float32


def test_build_memory_pairs_keys_with_gold_targets(
    make_llama: Callable[..., LlamaForCausalLM],
) -> None:
    lm = FrozenLM(make_llama(seed=5), "tiny", "rev")
    items = [EncodeItem([5, 6, 7], [8, 9]), EncodeItem([10, 11], [12, 13, 14])]
    spec = MemorySpec("rev", "fp", "T", MemoryMode.TEACHER_FORCED.value)
    mem = build_memory(lm, items, spec)
    assert mem.targets.tolist() == [8, 9, 12, 13, 14]
    assert mem.offsets.tolist() == [0, 2, 5]
    assert mem.keys.dtype == torch.float16 and mem.keys.shape == (5, 32)
    encoded = lm.encode(items, MemoryMode.TEACHER_FORCED)
    torch.testing.assert_close(
        mem.keys.float(), torch.cat([e.keys for e in encoded]).half().float()
    )
    with pytest.raises(DataError):
        build_memory(lm, [], spec)


def _data_files(root: Path) -> list[Path]:
    return sorted(
        (p for p in root.rglob("*") if p.is_file() and "manifest" not in p.name),
        key=lambda p: p.stat().st_size,
    )


def test_disk_store_round_trip_and_miss(tmp_path: Path) -> None:
    store = DiskMemoryStore(tmp_path / "cache")
    assert store.get("tenant-a", SPEC) is None
    mem = _memory()
    store.put("tenant-a", mem)
    _assert_same(store.get("tenant-a", SPEC), mem)
    # Another spec, or another tenant, is a miss.
    other = MemorySpec("rev-2", SPEC.dataset_fingerprint, SPEC.template, SPEC.mode)
    assert store.get("tenant-a", other) is None
    assert store.get("tenant-b", SPEC) is None


def test_disk_store_drops_corrupt_file(tmp_path: Path) -> None:
    store = DiskMemoryStore(tmp_path / "cache")
    mem = _memory(pairs=20, d=64)
    store.put("tenant-a", mem)
    victim = _data_files(tmp_path / "cache")[-1]  # the largest data file holds the keys
    data = bytearray(victim.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + 8):
        data[i] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert store.get("tenant-a", SPEC) is None
    assert not victim.exists()  # dropped, so it is rebuilt and never used
    assert store.get("tenant-a", SPEC) is None
    store.put("tenant-a", mem)
    _assert_same(store.get("tenant-a", SPEC), mem)
