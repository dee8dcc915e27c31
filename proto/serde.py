"""The one place tensors and heads cross the wire (both the coordinator and the tenant use it).

Tensors travel as raw little-endian bytes with dtype and shape. Every decode checks that the bytes
match the declared shape and dtype, so a malformed message is a DataError (INVALID_ARGUMENT on the
server, a clear error on the client), never a crash or a silently wrong array.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from pema.errors import DataError
from pema.head import HeadSpec
from proto.gen.pemaservice.v1 import coordinator_pb2 as pb

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "int32": torch.int32,
    "int64": torch.int64,
}
NAMES = {v: k for k, v in DTYPES.items()}
FP16_MAX = 65504.0
DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB: well under gRPC's default 4 MiB message limit
HEAD_TENSORS = ("norm_weight", "norm_bias", "weight", "bias")

# The wire is little-endian; so is every platform torch ships for, but say it once.
if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("proto.serde assumes a little-endian host")


def _to_bytes(t: Tensor) -> bytes:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_to_proto(t: Tensor, dtype: torch.dtype | None = None) -> pb.Tensor:
    """Serialize `t`, cast to `dtype` first when given."""
    if dtype is not None:
        t = t.to(dtype)
    if t.dtype not in NAMES:
        raise DataError(f"cannot serialize dtype {t.dtype}")
    return pb.Tensor(dtype=NAMES[t.dtype], shape=list(t.shape), data=_to_bytes(t))


def _check_meta(
    dtype: str, shape: Iterable[int], max_elements: int | None
) -> tuple[torch.dtype, list[int]]:
    if dtype not in DTYPES:
        raise DataError(f"tensor dtype {dtype!r} is not one of {sorted(DTYPES)}")
    dims = list(shape)
    if any(d < 0 for d in dims):
        raise DataError(f"tensor shape {dims} has a negative dimension")
    n = math.prod(dims)
    if max_elements is not None and n > max_elements:
        raise DataError(f"tensor of {n} elements exceeds the limit of {max_elements}")
    return DTYPES[dtype], dims


def tensor_from_bytes(
    data: bytes, dtype: str, shape: Iterable[int], max_elements: int | None = None
) -> Tensor:
    torch_dtype, dims = _check_meta(dtype, shape, max_elements)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    expected = math.prod(dims) * itemsize
    if len(data) != expected:
        raise DataError(
            f"tensor data has {len(data)} bytes, shape {dims} of {dtype} needs {expected}"
        )
    if expected == 0:
        return torch.empty(dims, dtype=torch_dtype)
    # bytearray: torch.frombuffer needs a writable buffer to give a tensor we may modify.
    return torch.frombuffer(bytearray(data), dtype=torch_dtype).reshape(dims)


def tensor_from_proto(msg: pb.Tensor, max_elements: int | None = None) -> Tensor:
    return tensor_from_bytes(msg.data, msg.dtype, msg.shape, max_elements)


def key_dtype(t: Tensor) -> torch.dtype:
    """fp16 halves the bytes, but pre-norm states can carry outliers beyond its range."""
    if t.numel() == 0 or float(t.abs().max()) < FP16_MAX:
        return torch.float16
    return torch.float32


def lossless_dtype(t: Tensor) -> torch.dtype:
    """The narrowest of bf16/fp32 that holds `t` exactly: a bf16 model's head ships at half size."""
    t32 = t.float()
    if torch.equal(t32.to(torch.bfloat16).float(), t32):
        return torch.bfloat16
    return torch.float32


def head_to_chunks(
    spec: HeadSpec, revision: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[pb.HeadChunk]:
    """A header naming every tensor, then each tensor's bytes in chunks of at most chunk_bytes."""
    if chunk_bytes < 1:
        raise DataError(f"chunk size must be positive, got {chunk_bytes}")
    tensors: dict[str, Tensor] = {}
    for name in HEAD_TENSORS:
        t = getattr(spec, name)
        if t is not None:
            tensors[name] = t.to(lossless_dtype(t))
    header = pb.HeadHeader(
        revision=revision,
        norm_kind=spec.norm_kind,
        eps=spec.eps,
        norm_weight_offset=spec.norm_weight_offset,
        softcap=spec.softcap or 0.0,
        tensors=[
            pb.TensorMeta(name=n, dtype=NAMES[t.dtype], shape=list(t.shape))
            for n, t in tensors.items()
        ],
    )
    yield pb.HeadChunk(header=header)
    for name, t in tensors.items():
        data = _to_bytes(t)
        for offset in range(0, len(data), chunk_bytes):
            yield pb.HeadChunk(
                chunk=pb.TensorChunk(
                    name=name, offset=offset, data=data[offset : offset + chunk_bytes]
                )
            )


def head_from_chunks(chunks: Iterable[pb.HeadChunk]) -> tuple[HeadSpec, str]:
    """Reassemble a HeadSpec (fp32 tensors) and its revision; every byte must arrive in order."""
    it = iter(chunks)
    first = next(it, None)
    if first is None or first.WhichOneof("part") != "header":
        raise DataError("head stream does not start with a header")
    header = first.header
    metas = {m.name: m for m in header.tensors}
    unknown = set(metas) - set(HEAD_TENSORS)
    if unknown or "weight" not in metas or "norm_weight" not in metas:
        raise DataError(f"head header names tensors {sorted(metas)}")
    buffers = {name: bytearray() for name in metas}
    for chunk in it:
        if chunk.WhichOneof("part") != "chunk":
            raise DataError("head stream has a second header")
        c = chunk.chunk
        if c.name not in buffers:
            raise DataError(f"head chunk for unknown tensor {c.name!r}")
        if c.offset != len(buffers[c.name]):
            raise DataError(
                f"head chunk for {c.name} at offset {c.offset}, expected {len(buffers[c.name])}"
            )
        buffers[c.name] += c.data
    tensors = {
        name: tensor_from_bytes(bytes(buffers[name]), m.dtype, m.shape).float()
        for name, m in metas.items()
    }
    spec = HeadSpec(
        norm_kind=header.norm_kind,
        eps=header.eps,
        norm_weight=tensors["norm_weight"],
        norm_bias=tensors.get("norm_bias"),
        norm_weight_offset=header.norm_weight_offset,
        weight=tensors["weight"],
        bias=tensors.get("bias"),
        softcap=header.softcap or None,
    )
    return spec, header.revision
