"""The frozen model's forward dtype: measured on this CPU, not assumed.

bf16 matrix products run 2-3x faster than fp32 on CPUs with bf16 instructions (AVX512-BF16, AMX)
and several times slower on CPUs without them (AVX2 only), so "auto" times both once per process.
The head's softmax, the losses, their gradients and the adapter stay fp32 whatever this picks.
"""

from __future__ import annotations

import functools
import os

import torch

from pema.errors import PemaError
from pema.process import median_time

DTYPES = {
    "auto": None,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float16": torch.float16,
}
ENV = "PEMA_DTYPE"  # overrides "auto" for every process of a deployment


@functools.cache
def fastest_matmul_dtype() -> torch.dtype:
    """bf16 or fp32, whichever multiplies model-sized matrices (d 576, MLP 1,536) faster here:
    the median of 3 timed products each, after a warm-up (well under a second in all)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 576, generator=gen), torch.randn(576, 1536, generator=gen)
    seconds: dict[torch.dtype, float] = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up
        seconds[dtype], _ = median_time(functools.partial(torch.matmul, x, y), 3)
    return min(seconds, key=seconds.__getitem__)


def resolve_dtype(name: str | None = None) -> torch.dtype:
    """The dtype called `name` (a key of DTYPES); None reads $PEMA_DTYPE, else "auto"."""
    name = name or os.environ.get(ENV) or "auto"
    if name not in DTYPES:
        raise PemaError(f"dtype must be one of {tuple(DTYPES)}, got {name!r}")
    return DTYPES[name] or fastest_matmul_dtype()
