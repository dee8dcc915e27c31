"""The LM head: the model's final norm and output embedding as a standalone fp32 module.

`softmax(head(f(c)))` reproduces the frozen model's next-token distribution from a pre-norm
last-layer hidden state f(c). The head is all a tenant holds of the model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from pema.errors import ModelError
from pema.files import atomic_file

# Attribute paths of the final norm in common decoder-only architectures.
_FINAL_NORM_PATHS = (
    "model.norm",  # Llama, Mistral, Qwen, Gemma, SmolLM
    "transformer.ln_f",  # GPT-2, GPT-J, Falcon
    "gpt_neox.final_layer_norm",
    "model.decoder.final_layer_norm",  # OPT
)


def _get_attr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_final_norm(model: nn.Module) -> tuple[str, nn.Module]:
    """The attribute path and module of the model's final normalization."""
    for path in _FINAL_NORM_PATHS:
        module = _get_attr_path(model, path)
        if isinstance(module, nn.Module):
            return path, module
    raise ModelError(f"{type(model).__name__}: cannot locate the final norm layer")


def _cpu_fp32(t: Tensor) -> Tensor:
    """A detached fp32 copy in host memory: the head travels and runs there whatever device the
    model sits on."""
    return t.detach().to("cpu", torch.float32, copy=True)


@dataclass
class HeadSpec:
    """Everything that defines the head, as plain tensors: what travels over the wire."""

    norm_kind: str  # "rms" or "layer"
    eps: float
    norm_weight: Tensor
    norm_bias: Tensor | None
    norm_weight_offset: float  # Gemma-style RMSNorm scales by (1 + w)
    weight: Tensor  # V x d output embedding
    bias: Tensor | None
    softcap: float | None  # final logit soft-capping, if the model applies one

    @classmethod
    def from_model(cls, model: nn.Module) -> HeadSpec:
        _, norm = find_final_norm(model)
        out = model.get_output_embeddings()  # type: ignore[operator]
        if not isinstance(out, nn.Linear):
            raise ModelError(f"{type(model).__name__}: output embedding is not a linear layer")
        config = getattr(model, "config", None)
        # A multimodal config keeps the language model's settings in its text config.
        text_config = config.get_text_config() if config is not None else None
        softcap = getattr(text_config, "final_logit_softcapping", None)
        if isinstance(norm, nn.LayerNorm):
            kind, eps = "layer", norm.eps
            nb = _cpu_fp32(norm.bias) if norm.bias is not None else None
        else:
            kind = "rms"
            eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
            nb = None
        nw = getattr(norm, "weight", None)
        if not isinstance(nw, Tensor):
            raise ModelError(f"{type(norm).__name__}: final norm has no weight")
        nw = _cpu_fp32(nw)
        return cls(
            norm_kind=kind,
            eps=float(eps),
            norm_weight=nw,
            norm_bias=nb,
            norm_weight_offset=_weight_offset(norm, kind, float(eps), nw, nb),
            weight=_cpu_fp32(out.weight),
            bias=_cpu_fp32(out.bias) if out.bias is not None else None,
            softcap=float(softcap) if softcap else None,
        )


def _normalize(
    h: Tensor, kind: str, eps: float, weight: Tensor, bias: Tensor | None, offset: float
) -> Tensor:
    if kind == "layer":
        return F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    scale = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h * scale * (weight + offset)


def _weight_offset(
    norm: nn.Module, kind: str, eps: float, weight: Tensor, bias: Tensor | None
) -> float:
    """The offset with which the head's norm reproduces the model's own on a probe: 0 (scale by
    w) or, for an RMSNorm, 1 (Gemma's 1 + w). Checked rather than guessed from the class name,
    so a norm the head cannot reproduce is refused instead of silently changing the model."""
    probe = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0)) * 3
    reference = copy.deepcopy(norm).to("cpu", torch.float32)
    with torch.no_grad():
        expected = reference(probe).float()
    for offset in (0.0, 1.0) if kind == "rms" else (0.0,):
        if torch.allclose(
            _normalize(probe, kind, eps, weight, bias, offset), expected, rtol=1e-4, atol=1e-5
        ):
            return offset
    raise ModelError(
        f"{type(norm).__name__}: the head cannot reproduce this final norm (it supports "
        "LayerNorm and RMSNorm scaled by w or by 1 + w)"
    )


class LMHead(nn.Module):
    """Final norm + output embedding, frozen, computed in fp32."""

    norm_weight: Tensor
    weight: Tensor
    norm_bias: Tensor | None
    bias: Tensor | None

    def __init__(self, spec: HeadSpec) -> None:
        super().__init__()
        if spec.norm_kind not in ("rms", "layer"):
            raise ModelError(f"unknown norm kind {spec.norm_kind!r}")
        if spec.weight.dim() != 2 or spec.norm_weight.shape != (spec.weight.shape[1],):
            raise ModelError(
                f"inconsistent head shapes: weight {tuple(spec.weight.shape)}, "
                f"norm {tuple(spec.norm_weight.shape)}"
            )
        self.spec = spec
        self.register_buffer("norm_weight", spec.norm_weight.float())
        self.register_buffer("weight", spec.weight.float())
        self.register_buffer(
            "norm_bias", spec.norm_bias.float() if spec.norm_bias is not None else None
        )
        self.register_buffer("bias", spec.bias.float() if spec.bias is not None else None)
        self._weight_cache: dict[torch.dtype, Tensor] = {}

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    def normalize(self, h: Tensor) -> Tensor:
        """N(h): the model's final norm with its learned weights."""
        s = self.spec
        return _normalize(
            h.float(), s.norm_kind, s.eps, self.norm_weight, self.norm_bias, s.norm_weight_offset
        )

    def logits_from_normalized(self, n: Tensor) -> Tensor:
        logits = F.linear(n, self.weight, self.bias)
        if self.spec.softcap:
            logits = torch.tanh(logits / self.spec.softcap) * self.spec.softcap
        return logits

    def forward(self, h: Tensor) -> Tensor:
        """Logits H(h) for pre-norm hidden states h (..., d)."""
        return self.logits_from_normalized(self.normalize(h))

    def log_probs(self, h: Tensor) -> Tensor:
        return torch.log_softmax(self.forward(h), dim=-1)

    def cross_entropy(
        self,
        h: Tensor,
        targets: Tensor,
        chunk_size: int = 256,
        matmul_dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Mean CE(H(h), targets) without ever holding the full batch of logits or their gradient.

        `matmul_dtype` bfloat16 runs the two V x d products 2.4x faster on this CPU; the softmax,
        the loss and the gradient that leaves this function stay fp32.
        """
        n = self.normalize(h)
        return _ChunkedLinearCE.apply(
            n,
            self._weight_as(matmul_dtype),
            self.bias,
            targets.long(),
            self.spec.softcap,
            chunk_size,
        )

    def _weight_as(self, dtype: torch.dtype) -> Tensor:
        if dtype == self.weight.dtype:
            return self.weight
        cached = self._weight_cache.get(dtype)
        if cached is None or cached.device != self.weight.device:  # the head moved since
            cached = self._weight_cache[dtype] = self.weight.to(dtype)
        return cached


class _ChunkedLinearCE(torch.autograd.Function):
    """CE of softmax(n W^T + b) in row chunks; the gradient w.r.t. n is formed during the forward
    pass, chunk by chunk, so peak memory is one chunk of logits instead of the whole batch's."""

    @staticmethod
    def forward(
        ctx: Any,
        n: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        softcap: float | None,
        chunk_size: int,
    ) -> Tensor:
        rows = n.shape[0]
        total = n.new_zeros(())
        grad_n = torch.empty_like(n) if n.requires_grad else None
        for i in range(0, rows, chunk_size):
            nc, tc = n[i : i + chunk_size], targets[i : i + chunk_size]
            z = F.linear(nc.to(weight.dtype), weight).float()
            if bias is not None:
                z = z + bias
            if softcap:
                t = torch.tanh(z / softcap)
                logits = t * softcap
            else:
                logits = z
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            if grad_n is not None:
                g = torch.softmax(logits, dim=-1)
                g[torch.arange(len(tc), device=tc.device), tc] -= 1.0
                if softcap:
                    g *= 1.0 - t * t
                grad_n[i : i + chunk_size] = (g.to(weight.dtype) @ weight).float() / rows
        ctx.save_for_backward(grad_n)
        return total / rows

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (grad_n,) = ctx.saved_tensors
        return grad_n * grad_out if grad_n is not None else None, None, None, None, None, None


def save_head(spec: HeadSpec, path: str | Path) -> None:
    """Write a head atomically as safetensors, its scalar settings in the metadata."""
    tensors = {"norm_weight": spec.norm_weight, "weight": spec.weight}
    if spec.norm_bias is not None:
        tensors["norm_bias"] = spec.norm_bias
    if spec.bias is not None:
        tensors["bias"] = spec.bias
    meta = {
        "norm_kind": spec.norm_kind,
        "eps": repr(spec.eps),
        "norm_weight_offset": repr(spec.norm_weight_offset),
        "softcap": repr(spec.softcap or 0.0),
    }
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def load_head(path: str | Path) -> HeadSpec:
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        return HeadSpec(
            norm_kind=meta["norm_kind"],
            eps=float(meta["eps"]),
            norm_weight=t["norm_weight"],
            norm_bias=t.get("norm_bias"),
            norm_weight_offset=float(meta["norm_weight_offset"]),
            weight=t["weight"],
            bias=t.get("bias"),
            softcap=float(meta["softcap"]) or None,
        )
    except (OSError, KeyError, ValueError, SafetensorError) as e:
        raise ModelError(f"{path}: not a readable head ({e})") from None
