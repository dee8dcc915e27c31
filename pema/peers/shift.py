"""SLaSh and JR-WARP: one trainable vector z for the whole model (METHODS.md section 3).

Each decoder layer l has a fixed random W_l ∈ R^{D×k}, entries N(0, 1/k), regenerated from a stored
seed and held as non-persistent buffers: never trained, never saved. Only z (k numbers) trains.

- SLaSh adds W_l z to every position of layer l's output. In a pre-norm decoder (Llama, SmolLM2)
  the layer output is the residual stream that the next normalization reads (the next layer's
  input norm, the final norm after the last layer), which is the pre-norm counterpart of the
  paper's "before the layer's output LayerNorm" in post-norm RoBERTa.
- JR-WARP prepends one prompt position whose layer-1 input is W_1 z, and adds W_l z to that
  position's hidden state at the input of every layer l ≥ 2.

For generation the "task head" is the model's own frozen LM head, so the trainable count is
exactly k. z reaches the model through `ZSource`, which hands each row of the batch its own copy
of z: that lets Opacus capture per-sample gradients of z for DP-SGD.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel

from pema.errors import PemaError
from pema.peers.sft import Peer

METHODS = ("slash", "jrwarp")


class ZSource(nn.Module):
    """Holds z; forward(ones (B, 1)) returns B copies of z, one per sample."""

    def __init__(self, k: int, generator: torch.Generator) -> None:
        super().__init__()
        self.z = nn.Parameter(torch.randn(k, generator=generator) / k**0.5)

    def forward(self, ones: Tensor) -> Tensor:
        return ones * self.z


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise PemaError(f"{type(model).__name__}: cannot find the decoder layers (model.layers)")
    return layers


class ShiftPeer(Peer):
    def __init__(self, model: PreTrainedModel, method: str, k: int = 1024, seed: int = 0) -> None:
        super().__init__()
        if method not in METHODS:
            raise PemaError(f"method must be one of {METHODS}, got {method!r}")
        if k < 1:
            raise PemaError(f"k must be at least 1, got {k}")
        model.requires_grad_(False)
        self.model = model
        self.config = model.config
        self.method = method
        self.seed = seed
        layers = decoder_layers(model)
        d = int(model.config.hidden_size)
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(len(layers), d, k, generator=gen) / k**0.5
        self.register_buffer("W", w, persistent=False)
        # z is drawn after W from the same seeded stream, so the seed fixes both.
        self.z_source = ZSource(k, gen)
        self._shifts: Tensor | None = None  # (layers, B or 1, D) for the current forward pass
        self._prefix_live = False  # JR-WARP: the prompt position is in this forward pass
        self._precomputed: Tensor | None = None
        for index, layer in enumerate(layers):
            if method == "slash":
                layer.register_forward_hook(self._make_output_hook(index))
            elif index >= 1:
                layer.register_forward_pre_hook(self._make_input_hook(index), with_kwargs=True)

    def _make_output_hook(self, index: int) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            assert self._shifts is not None
            shift = self._shifts[index][:, None, :].to(output.dtype)
            return output + shift

        return hook

    def _make_input_hook(self, index: int) -> Any:
        def hook(_module: nn.Module, args: Any, kwargs: Any) -> Any:
            if not self._prefix_live:
                return None
            assert self._shifts is not None
            hidden = args[0] if args else kwargs["hidden_states"]
            pad = torch.zeros_like(hidden)
            pad[:, 0] = self._shifts[index].to(hidden.dtype)
            hidden = hidden + pad
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    def shifts(self, batch: int) -> Tensor:
        """W_l z for every layer: (layers, batch, D), from the precomputed copy when there is one."""
        if self._precomputed is not None:
            return self._precomputed.expand(-1, batch, -1)
        z = self.z_source(torch.ones(batch, 1))
        return torch.einsum("bk,ldk->lbd", z, self.W)

    def prepare_inference(self) -> None:
        """Compute the shifts once: serving then adds a constant per layer, no extra latency."""
        with torch.no_grad():
            self._precomputed = torch.einsum("k,ldk->ld", self.z_source.z, self.W)[:, None]

    def train(self, mode: bool = True) -> ShiftPeer:
        # Training changes z, so a precomputed copy would go stale.
        if mode:
            self._precomputed = None
        return super().train(mode)

    def logits(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor | None = None,
        cache: DynamicCache | None = None,
    ) -> Tensor:
        rows = input_ids.shape[0]
        if position_ids is None:
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        self._shifts = self.shifts(rows)
        try:
            if self.method == "slash":
                return self.model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    cache=cache,
                    use_cache=cache is not None,
                ).logits
            return self._jrwarp_logits(input_ids, attention_mask, position_ids, cache)
        finally:
            self._shifts = None

    def _jrwarp_logits(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        cache: DynamicCache | None,
    ) -> Tensor:
        assert self._shifts is not None
        rows = input_ids.shape[0]
        # The prompt position enters once, with the first call; later cached steps only attend to it.
        first = cache is None or cache.get_seq_length() == 0
        embeds = self.model.get_input_embeddings()(input_ids)
        ones = torch.ones(rows, 1, dtype=attention_mask.dtype)
        mask = torch.cat([ones, attention_mask], dim=1)
        positions = position_ids + 1
        if first:
            prefix = self._shifts[0][:, None, :].to(embeds.dtype)
            embeds = torch.cat([prefix, embeds], dim=1)
            positions = torch.cat([torch.zeros_like(positions[:, :1]), positions], dim=1)
        self._prefix_live = first
        try:
            logits = self.model(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=cache is not None,
            ).logits
        finally:
            self._prefix_live = False
        return logits[:, 1:] if first else logits

    def inference_parameter_count(self) -> int:
        return self.z_source.z.numel()
