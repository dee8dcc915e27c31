"""proto.serde: tensors and heads survive the wire exactly, malformed messages are DataErrors."""

from __future__ import annotations

import pytest
import torch

from pema.errors import DataError
from pema.head import HeadSpec
from proto import serde
from proto.gen.pemaservice.v1 import coordinator_pb2 as pb


@pytest.mark.parametrize("dtype", list(serde.DTYPES.values()))
@pytest.mark.parametrize("shape", [(3, 5), (0, 4), (7,), ()])
def test_tensor_round_trip(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = (torch.randn(shape) * 100).to(dtype)
    msg = pb.Tensor.FromString(serde.tensor_to_proto(t).SerializeToString())
    back = serde.tensor_from_proto(msg)
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)


def test_cast_on_the_way_out() -> None:
    t = torch.randn(4, 6)
    back = serde.tensor_from_proto(serde.tensor_to_proto(t, torch.float16))
    assert back.dtype == torch.float16
    torch.testing.assert_close(back.float(), t, atol=1e-2, rtol=1e-3)


def test_key_dtype_falls_back_where_fp16_overflows() -> None:
    assert serde.key_dtype(torch.tensor([1.0, -60000.0])) == torch.float16
    assert serde.key_dtype(torch.tensor([1.0, 70000.0])) == torch.float32


@pytest.mark.parametrize(
    ("msg", "error"),
    [
        (pb.Tensor(dtype="float64", shape=[1], data=b"\0" * 8), "not one of"),
        (pb.Tensor(dtype="float32", shape=[2, 2], data=b"\0" * 15), "needs 16"),
        (pb.Tensor(dtype="float32", shape=[-1, 4], data=b""), "negative"),
        (pb.Tensor(dtype="float16", shape=[3], data=b"\0" * 8), "needs 6"),
    ],
)
def test_malformed_tensors(msg: pb.Tensor, error: str) -> None:
    with pytest.raises(DataError, match=error):
        serde.tensor_from_proto(msg)


def test_element_limit() -> None:
    msg = serde.tensor_to_proto(torch.zeros(10, 10))
    with pytest.raises(DataError, match="exceeds"):
        serde.tensor_from_proto(msg, max_elements=99)


def _spec(bias: bool) -> HeadSpec:
    return HeadSpec(
        norm_kind="layer" if bias else "rms",
        eps=1e-5,
        norm_weight=torch.randn(8),
        norm_bias=torch.randn(8) if bias else None,
        norm_weight_offset=1.0 if bias else 0.0,
        weight=torch.randn(50, 8).to(torch.bfloat16).float(),  # bf16-exact: ships as bf16
        bias=torch.randn(50) if bias else None,
        softcap=30.0 if bias else None,
    )


@pytest.mark.parametrize("bias", [False, True])
def test_head_round_trip_in_small_chunks(bias: bool) -> None:
    spec = _spec(bias)
    chunks = list(serde.head_to_chunks(spec, "rev1", chunk_bytes=64))
    assert all(len(c.chunk.data) <= 64 for c in chunks[1:])
    metas = {m.name: m.dtype for m in chunks[0].header.tensors}
    assert metas["weight"] == "bfloat16" and metas["norm_weight"] == "float32"
    wire = [pb.HeadChunk.FromString(c.SerializeToString()) for c in chunks]
    back, revision = serde.head_from_chunks(wire)
    assert revision == "rev1"
    for name in serde.HEAD_TENSORS:
        a, b = getattr(spec, name), getattr(back, name)
        assert (a is None and b is None) or (b.dtype == torch.float32 and torch.equal(a, b))
    assert (back.norm_kind, back.eps, back.norm_weight_offset, back.softcap) == (
        spec.norm_kind,
        spec.eps,
        spec.norm_weight_offset,
        spec.softcap,
    )


def test_head_stream_errors() -> None:
    chunks = list(serde.head_to_chunks(_spec(False), "r", chunk_bytes=64))
    with pytest.raises(DataError, match="header"):
        serde.head_from_chunks(chunks[1:])
    with pytest.raises(DataError, match="offset"):
        serde.head_from_chunks([*chunks[:2], *chunks[3:]])  # a chunk went missing
    with pytest.raises(DataError, match="needs"):
        serde.head_from_chunks(chunks[:-1])  # truncated
    with pytest.raises(DataError, match="second header"):
        serde.head_from_chunks([chunks[0], chunks[0]])
