"""The forward dtype: named, from $PEMA_DTYPE, or measured ("auto"); memories built in different
dtypes never share a cache address."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pema.backbone import MemoryMode, ModelInfo
from pema.data import Pair
from pema.dtypes import ENV, fastest_matmul_dtype, resolve_dtype
from pema.errors import PemaError
from pema.memory import memory_spec


def test_named_dtypes_resolve_without_measuring() -> None:
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16


def test_auto_picks_the_measured_faster_of_bf16_and_fp32() -> None:
    picked = resolve_dtype("auto")
    assert picked in (torch.float32, torch.bfloat16)
    assert picked is fastest_matmul_dtype()  # measured once per process


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
