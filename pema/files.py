"""Atomic file writes, shared by every cache this package keeps (heads, memories, dtype choices)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A fresh temporary path beside `path`, renamed onto it when the block succeeds.

    Readers see the old file or the whole new one, never half; concurrent writers of the same
    file (two threads or tenants downloading one head) each get their own temporary, so the last
    rename wins instead of one writer renaming the other's temporary away. A failed block leaves
    `path` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
