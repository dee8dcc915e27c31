"""The frozen model's device and forward dtype: named, from the environment, or chosen ("auto").

Device: `auto` takes the first CUDA device when there is one, else the CPU; `cpu` and `cuda[:N]`
name one ($PEMA_DEVICE overrides `auto` for every process of a deployment).

Dtype: on a GPU `auto` is bf16 (fp16 where the GPU has no bf16). On a CPU, bf16 matrix products
run 2-3x faster than fp32 where the CPU has bf16 instructions (AVX512-BF16, AMX) and several times
slower where it has not (AVX2 only), so `auto` times both, once per machine and model shape, and
records the pick in $PEMA_CACHE_DIR/dtype-choices.json: later starts read it instead of re-timing
(a timing under load could flip it, and with it numerics and memory cache addresses). Delete the
entry (or the file) to measure again. The head's softmax, the losses, their gradients and the
adapter stay fp32 whatever this picks.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
from datetime import UTC, datetime
from pathlib import Path

import torch

from pema.errors import PemaError
from pema.files import atomic_file
from pema.process import median_time

DTYPES = {
    "auto": None,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float16": torch.float16,
}
ENV = "PEMA_DTYPE"  # overrides "auto" for every process of a deployment
DEVICE_ENV = "PEMA_DEVICE"
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(?::(\d+))?")
CHOICES_FILE = "dtype-choices.json"
# The default model's sizes (SmolLM2-135M: hidden 576, MLP 1,536): the probe's default shape.
PROBE_SHAPE = (576, 1536)


def check_device_name(name: str) -> str:
    """`name` if it is auto, cpu or cuda[:N]; the configuration's early check."""
    if not DEVICE_PATTERN.fullmatch(name):
        raise PemaError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    return name


def resolve_device(name: str | None = None, cuda_devices: int | None = None) -> torch.device:
    """The device called `name`; None reads $PEMA_DEVICE, else "auto". `cuda_devices` (default:
    what torch sees) is how many CUDA devices there are."""
    name = check_device_name(name or os.environ.get(DEVICE_ENV) or "auto")
    if cuda_devices is None:
        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == "auto":
        return torch.device("cuda", 0) if cuda_devices else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = DEVICE_PATTERN.fullmatch(name)
    index = int(match.group(1) or 0) if match else 0
    if index >= cuda_devices:
        raise PemaError(
            f"device {name}: this machine has {cuda_devices} CUDA device(s)"
            + ("" if cuda_devices else " (or this torch build has no CUDA)")
        )
    return torch.device("cuda", index)


def accelerator_dtype(bf16_supported: bool) -> torch.dtype:
    """A GPU's forward dtype: bf16 (fp32's range, so pre-norm outliers cannot overflow), else
    fp16."""
    return torch.bfloat16 if bf16_supported else torch.float16


@functools.cache
def fastest_matmul_dtype(shape: tuple[int, int] = PROBE_SHAPE) -> torch.dtype:
    """bf16 or fp32, whichever multiplies 64 x d by d x d_mlp matrices faster on this CPU: the
    median of 3 timed products each, after a warm-up (well under a second in all)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, shape[0], generator=gen), torch.randn(*shape, generator=gen)
    seconds: dict[torch.dtype, float] = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up
        seconds[dtype], _ = median_time(functools.partial(torch.matmul, x, y), 3)
    return min(seconds, key=seconds.__getitem__)


def machine_key(shape: tuple[int, int]) -> str:
    """What the CPU timing depends on: the CPU, the torch build and the matrix shape."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return f"{cpu} | torch {torch.__version__} | {shape[0]}x{shape[1]}"


def recorded_cpu_dtype(
    shape: tuple[int, int] = PROBE_SHAPE, path: Path | None = None
) -> torch.dtype:
    """The CPU's faster dtype for this shape: from the record when there is one, else measured
    now and recorded (an unreadable record is measured again and rewritten)."""
    if path is None:
        from pema.models import cache_dir  # pema.models imports this module

        path = cache_dir() / CHOICES_FILE
    key = machine_key(shape)
    try:
        choices = json.loads(path.read_text())
        if not isinstance(choices, dict):
            choices = {}
    except (OSError, ValueError):
        choices = {}
    entry = choices.get(key)
    if isinstance(entry, dict) and entry.get("dtype") in ("float32", "bfloat16"):
        return DTYPES[entry["dtype"]] or torch.float32
    picked = fastest_matmul_dtype(shape)
    choices[key] = {
        "dtype": str(picked).removeprefix("torch."),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(choices, indent=2, sort_keys=True))
    except OSError:
        pass  # a read-only cache: the choice holds for this process only
    return picked


def resolve_dtype(
    name: str | None = None,
    device: torch.device | None = None,
    shape: tuple[int, int] = PROBE_SHAPE,
) -> torch.dtype:
    """The dtype called `name` (a key of DTYPES); None reads $PEMA_DTYPE, else "auto": on a CUDA
    `device` bf16 (or fp16), on the CPU the recorded faster one for matrices of `shape`."""
    name = name or os.environ.get(ENV) or "auto"
    if name not in DTYPES:
        raise PemaError(f"dtype must be one of {tuple(DTYPES)}, got {name!r}")
    named = DTYPES[name]
    if named is not None:
        return named
    if device is not None and device.type == "cuda":
        return accelerator_dtype(torch.cuda.is_bf16_supported())
    return recorded_cpu_dtype(shape)
