"""The external memory: (key = f(c), value = gold next token) for every target token of a dataset."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from pema.backbone import Backbone, EncodeItem, MemoryMode, ModelInfo
from pema.data import Pair, dataset_fingerprint
from pema.errors import DataError, MemoryFormatError
from pema.files import atomic_file

FP16_MAX = 65504.0


@dataclass(frozen=True)
class MemorySpec:
    """What a memory is built from; its `address` names it in any cache."""

    model_revision: str
    dataset_fingerprint: str
    template: str
    mode: str
    # Keys differ with the forward dtype; "" in memories from before it was recorded.
    forward_dtype: str = ""

    @property
    def address(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:32]


def memory_spec(
    info: ModelInfo, pairs: Sequence[Pair], template: str, mode: MemoryMode
) -> MemorySpec:
    """The spec of the memory that this model (revision and forward dtype) builds from these
    pairs under this template and mode."""
    return MemorySpec(info.revision, dataset_fingerprint(pairs), template, mode.value, info.dtype)


@dataclass
class Memory:
    spec: MemorySpec
    keys: Tensor  # N x d, float16 (or float32 where fp16 would overflow)
    targets: Tensor  # N, int32
    offsets: Tensor  # P + 1, int64: keys of pair i are rows offsets[i]:offsets[i+1]

    def __post_init__(self) -> None:
        if (
            self.keys.dim() != 2
            or self.targets.dim() != 1
            or self.keys.shape[0] != self.targets.shape[0]
        ):
            raise MemoryFormatError(
                f"keys {tuple(self.keys.shape)} and targets {tuple(self.targets.shape)} do not match"
            )
        if self.offsets.dim() != 1 or int(self.offsets[-1]) != self.keys.shape[0]:
            raise MemoryFormatError("pair offsets do not cover the keys")

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @property
    def n_pairs(self) -> int:
        return int(self.offsets.shape[0] - 1)

    def pair_index(self) -> Tensor:
        """N: the pair each key belongs to."""
        return torch.repeat_interleave(
            torch.arange(self.n_pairs), self.offsets[1:] - self.offsets[:-1]
        )

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.targets.nbytes)

    def fingerprint(self) -> str:
        """Content hash of the stored arrays and their spec."""
        h = hashlib.sha256(self.spec.address.encode())
        for t in (self.keys, self.targets, self.offsets):
            h.update(str(t.dtype).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:32]

    def split_pairs(self, pair_indices: Sequence[int]) -> Memory:
        """The sub-memory of the given pairs (e.g. a held-out part for validation)."""
        rows = [torch.arange(int(self.offsets[i]), int(self.offsets[i + 1])) for i in pair_indices]
        idx = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        return Memory(self.spec, self.keys[idx], self.targets[idx], offsets)

    def save(self, path: str | Path) -> None:
        """Write atomically: a reader sees the old file or the whole new one, never half."""
        with atomic_file(path) as tmp:
            save_file(
                {
                    "keys": self.keys.contiguous(),
                    "targets": self.targets.contiguous(),
                    "offsets": self.offsets,
                },
                str(tmp),
                metadata={
                    "spec": json.dumps(asdict(self.spec)),
                    "fingerprint": self.fingerprint(),
                },
            )

    @classmethod
    def load(cls, path: str | Path, expect: MemorySpec | None = None) -> Memory:
        path = Path(path)
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
            spec = MemorySpec(**json.loads(meta["spec"]))
            memory = cls(spec, tensors["keys"], tensors["targets"], tensors["offsets"])
        except (OSError, SafetensorError, KeyError, TypeError, ValueError) as e:
            raise MemoryFormatError(f"{path}: not a readable memory ({e})") from None
        if memory.fingerprint() != meta.get("fingerprint"):
            raise MemoryFormatError(f"{path}: content does not match its fingerprint (corrupt)")
        if expect is not None and spec != expect:
            raise MemoryFormatError(f"{path}: holds a memory for {spec}, expected {expect}")
        return memory


def storage_dtype(max_abs: float) -> torch.dtype:
    """fp16 halves the memory, but pre-norm states can carry outliers beyond its range."""
    return torch.float16 if max_abs < FP16_MAX else torch.float32


def build_memory(
    backbone: Backbone,
    items: Sequence[EncodeItem],
    spec: MemorySpec,
    progress: Callable[[int], None] | None = None,
) -> Memory:
    """Encode every item and pair each key with its gold next token."""
    if not items:
        raise DataError("no pairs to build a memory from")
    encoded = backbone.encode(items, MemoryMode(spec.mode), progress)
    keys = torch.cat([e.keys for e in encoded])
    targets = torch.tensor([t for it in items for t in it.target], dtype=torch.int32)
    lengths = torch.tensor([len(it.target) for it in items], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    max_abs = float(keys.abs().max())
    return Memory(spec, keys.to(storage_dtype(max_abs)), targets, offsets)
