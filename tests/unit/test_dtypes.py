"""The device and forward dtype: named, from $PEMA_DEVICE / $PEMA_DTYPE, or chosen ("auto": CUDA
when present; bf16 on a GPU; on a CPU measured once and recorded); memories built in different
dtypes never share a cache address."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from unittest.mock import ANY

import pytest
import torch

from pema.backbone import MemoryMode, ModelInfo
from pema.data import Pair
from pema.dtypes import (
    CHOICES_FILE,
    DEVICE_ENV,
    ENV,
    accelerator_dtype,
    fastest_matmul_dtype,
    machine_key,
    recorded_cpu_dtype,
    resolve_device,
    resolve_dtype,
)
from pema.errors import PemaError
from pema.memory import memory_spec
from pema.settings import CACHE_ENV


def test_named_dtypes_resolve_without_measuring() -> None:
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16


def test_auto_picks_the_measured_faster_of_bf16_and_fp32(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    picked = resolve_dtype("auto")
    assert picked in (torch.float32, torch.bfloat16)
    assert picked is fastest_matmul_dtype()  # measured once per process
    (entry,) = json.loads((tmp_path / CHOICES_FILE).read_text()).values()
    assert entry["dtype"] == str(picked).removeprefix("torch.")


def test_the_cpu_choice_is_recorded_once_then_read_not_retimed(tmp_path: Path) -> None:
    record = tmp_path / "choices.json"
    shape = (64, 128)
    first = recorded_cpu_dtype(shape, record)
    assert json.loads(record.read_text()) == {
        machine_key(shape): {"dtype": str(first).removeprefix("torch."), "measured_at": ANY}
    }
    # A record that says the other dtype wins: later starts follow it instead of re-timing.
    other = "bfloat16" if first is torch.float32 else "float32"
    record.write_text(json.dumps({machine_key(shape): {"dtype": other}}))
    assert str(recorded_cpu_dtype(shape, record)) == f"torch.{other}"
    assert recorded_cpu_dtype((32, 64), record) is fastest_matmul_dtype((32, 64))  # per shape
    assert len(json.loads(record.read_text())) == 2
    record.write_text("{not json")  # unreadable: measured again and rewritten
    assert recorded_cpu_dtype(shape, record) is fastest_matmul_dtype(shape)
    assert machine_key(shape) in json.loads(record.read_text())


def test_accelerators_run_bf16_else_fp16() -> None:
    assert accelerator_dtype(True) is torch.bfloat16
    assert accelerator_dtype(False) is torch.float16


def test_device_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert resolve_device(None, cuda_devices=0) == torch.device("cpu")
    assert resolve_device("auto", cuda_devices=2) == torch.device("cuda", 0)
    assert resolve_device("cpu", cuda_devices=2) == torch.device("cpu")
    assert resolve_device("cuda", cuda_devices=1) == torch.device("cuda", 0)
    assert resolve_device("cuda:1", cuda_devices=2) == torch.device("cuda", 1)
    with pytest.raises(PemaError, match="has 2 CUDA device"):
        resolve_device("cuda:2", cuda_devices=2)
    with pytest.raises(PemaError, match="no CUDA"):
        resolve_device("cuda", cuda_devices=0)
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", "cuda:0:1"):
        with pytest.raises(PemaError, match="auto, cpu or cuda"):
            resolve_device(bad)
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert resolve_device(None, cuda_devices=1) == torch.device("cpu")
    assert resolve_device("cuda", cuda_devices=1) == torch.device("cuda", 0)  # a name wins
    # This test machine: auto is whatever torch sees.
    monkeypatch.delenv(DEVICE_ENV)
    assert resolve_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_environment_overrides_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "bfloat16")
    assert resolve_dtype() is torch.bfloat16
    monkeypatch.setenv(ENV, "float32")
    assert resolve_dtype() is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16  # an explicit name wins


@pytest.mark.parametrize("name", ["fp32", "int8", "Float32"])
def test_unknown_names_are_refused(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PemaError, match="dtype must be one of"):
        resolve_dtype(name)
    monkeypatch.setenv(ENV, name)
    with pytest.raises(PemaError, match="dtype must be one of"):
        resolve_dtype()


def test_memory_address_depends_on_the_forward_dtype() -> None:
    info = ModelInfo("m", "rev", 32, 100, 512, "float32", "rms")
    pairs = [Pair("a", "b")]
    fp32 = memory_spec(info, pairs, "T {source}", MemoryMode.TEACHER_FORCED)
    bf16 = memory_spec(
        replace(info, dtype="bfloat16"), pairs, "T {source}", MemoryMode.TEACHER_FORCED
    )
    assert (fp32.forward_dtype, bf16.forward_dtype) == ("float32", "bfloat16")
    assert fp32.address != bf16.address
    assert replace(fp32, forward_dtype="bfloat16") == bf16
