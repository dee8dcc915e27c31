"""The on-disk memory cache, the embedded default when no Redis URL is given."""

from __future__ import annotations

from pathlib import Path

from pema.errors import MemoryFormatError
from pema.memory import Memory, MemorySpec


class DiskMemoryStore:
    """One safetensors file per memory, named by its content address; corrupt files are dropped."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, tenant: str, spec: MemorySpec) -> Path:
        return self.root / tenant / f"{spec.address}.safetensors"

    def get(self, tenant: str, spec: MemorySpec) -> Memory | None:
        path = self._path(tenant, spec)
        if not path.is_file():
            return None
        try:
            return Memory.load(path, expect=spec)
        except MemoryFormatError:
            path.unlink(missing_ok=True)  # rebuilt by the caller, never used
            return None

    def put(self, tenant: str, memory: Memory) -> None:
        path = self._path(tenant, memory.spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        memory.save(path)
