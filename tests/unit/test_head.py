"""LMHead: the norm + output embedding, and its chunked cross entropy against torch's own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_model import make_tiny_gemma3
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from pema.errors import ModelError
from pema.head import HeadSpec, LMHead, load_head, save_head


def _spec(
    kind: str = "rms",
    d: int = 24,
    vocab: int = 301,
    bias: bool = False,
    softcap: float | None = None,
    seed: int = 0,
) -> HeadSpec:
    g = torch.Generator().manual_seed(seed)
    return HeadSpec(
        norm_kind=kind,
        eps=1e-5,
        norm_weight=torch.rand(d, generator=g) + 0.5,
        norm_bias=torch.randn(d, generator=g) * 0.1 if kind == "layer" else None,
        norm_weight_offset=0.0,
        weight=torch.randn(vocab, d, generator=g),
        bias=torch.randn(vocab, generator=g) if bias else None,
        softcap=softcap,
    )


def _inputs(rows: int, d: int, vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, d, generator=g) * 3
    h[:, 0] *= 50  # an outlier feature, like the real model's massive activations
    targets = torch.randint(0, vocab, (rows,), generator=g)
    return h, targets


def _reference(head: LMHead, h: torch.Tensor, targets: torch.Tensor):
    h = h.clone().requires_grad_(True)
    loss = F.cross_entropy(head(h), targets)
    loss.backward()
    return loss.detach(), h.grad


def _chunked(head: LMHead, h: torch.Tensor, targets: torch.Tensor, chunk: int, dtype=torch.float32):
    h = h.clone().requires_grad_(True)
    loss = head.cross_entropy(h, targets, chunk, dtype)
    loss.backward()
    return loss.detach(), h.grad


@pytest.mark.parametrize("chunk", [1, 7, 16, 37, 1000])
@pytest.mark.parametrize(
    "spec_kw",
    [{}, {"kind": "layer"}, {"bias": True}, {"softcap": 8.0}],
    ids=["rms", "layernorm", "bias", "softcap"],
)
def test_chunked_ce_equals_torch_fp32(chunk: int, spec_kw: dict) -> None:
    head = LMHead(_spec(**spec_kw))
    h, targets = _inputs(37, 24, 301)  # 37 rows: most chunk sizes leave a ragged last chunk
    ref_loss, ref_grad = _reference(head, h, targets)
    loss, grad = _chunked(head, h, targets, chunk)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("chunk", [5, 16, 64])
def test_chunked_ce_bf16_matmul_within_tolerance(chunk: int) -> None:
    head = LMHead(_spec(d=64, vocab=1000))
    h, targets = _inputs(50, 64, 1000, seed=2)
    ref_loss, ref_grad = _reference(head, h, targets)
    loss, grad = _chunked(head, h, targets, chunk, torch.bfloat16)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    # bf16 keeps ~3 significant digits: the gradient points the same way, to within a few %.
    cos = F.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0)
    assert cos > 0.995
    assert (grad - ref_grad).norm() / ref_grad.norm() < 0.05


def test_chunked_ce_scales_upstream_gradient_and_skips_frozen_input() -> None:
    head = LMHead(_spec())
    h, targets = _inputs(9, 24, 301)
    h1 = h.clone().requires_grad_(True)
    (3.0 * head.cross_entropy(h1, targets, 4)).backward()
    _, ref_grad = _reference(head, h, targets)
    torch.testing.assert_close(h1.grad, 3.0 * ref_grad, rtol=1e-4, atol=1e-7)
    # Without gradients the loss is still right.
    with torch.no_grad():
        torch.testing.assert_close(
            head.cross_entropy(h, targets, 4), F.cross_entropy(head(h), targets)
        )


def test_head_save_load_round_trip(tmp_path: Path) -> None:
    spec = _spec(kind="layer", bias=True, softcap=30.0)
    save_head(spec, tmp_path / "head.safetensors")
    loaded = load_head(tmp_path / "head.safetensors")
    h, _ = _inputs(4, 24, 301)
    torch.testing.assert_close(LMHead(loaded)(h), LMHead(spec)(h), rtol=0, atol=0)
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(ModelError):
        load_head(tmp_path / "bad.safetensors")


def test_concurrent_writers_of_one_head_each_finish_and_leave_one_whole_file(
    tmp_path: Path,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    spec = _spec(kind="layer", bias=True, softcap=30.0)
    path = tmp_path / "heads" / "rev.safetensors"
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: save_head(spec, path), range(32)))  # raises if one failed
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporaries left
    torch.testing.assert_close(load_head(path).weight, spec.weight, rtol=0, atol=0)


def test_head_rejects_inconsistent_shapes() -> None:
    spec = _spec()
    spec.norm_weight = torch.ones(5)
    with pytest.raises(ModelError):
        LMHead(spec)


class _DoubledRMSNorm(nn.Module):
    """An RMSNorm scaled by 2w: neither Llama's w nor Gemma's 1 + w."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.eps = 1e-6
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def test_head_takes_the_norm_scale_the_model_computes_and_refuses_others() -> None:
    model = make_tiny_gemma3()
    assert HeadSpec.from_model(model).norm_weight_offset == 1.0  # Gemma3RMSNorm: 1 + w
    model.model.norm = LlamaRMSNorm(32)
    assert HeadSpec.from_model(model).norm_weight_offset == 0.0
    model.model.norm = _DoubledRMSNorm(32)
    with pytest.raises(ModelError, match="_DoubledRMSNorm"):
        HeadSpec.from_model(model)
