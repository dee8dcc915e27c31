"""LoRA (through peft), full fine-tuning, and AdaMix: a mixture of LoRA copies merged by averaging."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from transformers import PreTrainedModel

from pema.errors import PemaError
from pema.peers.sft import IGNORE, Batch, HFPeer, target_loss
from pema.settings import DEFAULT_TARGETS
from pema.training import symmetric_kl


def lora_peer(
    model: PreTrainedModel,
    rank: int = 8,
    alpha: int = 16,
    targets: Sequence[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
    top_layers: int | None = None,
) -> HFPeer:
    """Plain LoRA via peft: only the low-rank factors train; with `top_layers` only in that many
    of the last transformer blocks (what an owner reveals if it offers a top-block recipe)."""
    layers = None
    if top_layers is not None:
        n = int(model.config.num_hidden_layers)
        if not 1 <= top_layers <= n:
            raise PemaError(f"top_layers must be in [1, {n}], got {top_layers}")
        layers = list(range(n - top_layers, n))
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        lora_dropout=dropout,
        bias="none",
        layers_to_transform=layers,
    )
    try:
        with warnings.catch_warnings():
            # peft probes the deprecated `is_gradient_checkpointing` property of transformers 5,
            # which warns on every run; the probe is peft's, not ours, and harmless.
            warnings.filterwarnings(
                "ignore",
                message="`is_gradient_checkpointing` is deprecated",
                category=FutureWarning,
            )
            return HFPeer(get_peft_model(model, config), model.config)
    except ValueError as e:  # peft's NoMatchingPeftModuleError is one, with a paragraph of text
        raise PemaError(f"--targets {','.join(targets)}: no such module in the model") from e


def full_peer(model: PreTrainedModel) -> HFPeer:
    """Every weight trains (tied embeddings count once, as parameters() yields them once)."""
    model.requires_grad_(True)
    return HFPeer(model, model.config)


class LoRALinear(nn.Module):
    """A frozen linear layer plus one low-rank update: y = base(x) + s · x Aᵀ Bᵀ."""

    def __init__(self, base: nn.Linear, A: Tensor, B: Tensor, scaling: float) -> None:
        super().__init__()
        self.base = base
        self.A = nn.Parameter(A.clone())
        self.B = nn.Parameter(B.clone())
        self.scaling = scaling

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scaling * F.linear(F.linear(x, self.A), self.B)


class MixLoRALinear(nn.Module):
    """AdaMix over LoRA: M down-projections A_i (identical init), one shared up-projection B.

    Training routes each forward pass through one copy drawn uniformly at random (one choice for
    the whole batch); evaluation uses the average of the copies' weights, so `merged()` is one
    plain LoRALinear with exactly LoRA's parameters and cost.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, mixture: int) -> None:
        super().__init__()
        if mixture < 1 or rank < 1:
            raise PemaError(f"mixture and rank must be at least 1, got {mixture}, {rank}")
        self.base = base
        A = torch.empty(rank, base.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.A = nn.Parameter(A.expand(mixture, -1, -1).clone())
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scaling = alpha / rank

    def averaged_A(self) -> Tensor:
        return self.A.mean(0)

    def forward(self, x: Tensor) -> Tensor:
        # One random copy per pass in training (one choice for the whole batch).
        A = self.A[int(torch.randint(self.A.shape[0], ()))] if self.training else self.averaged_A()
        return self.base(x) + self.scaling * F.linear(F.linear(x, A), self.B)

    def merged(self) -> LoRALinear:
        return LoRALinear(self.base, self.averaged_A().detach(), self.B.detach(), self.scaling)


class AdaMixPeer(HFPeer):
    def __init__(
        self,
        model: PreTrainedModel,
        rank: int = 8,
        alpha: float = 16.0,
        targets: Sequence[str] = DEFAULT_TARGETS,
        mixture: int = 4,
        consistency: float = 1.0,
    ) -> None:
        super().__init__(model, model.config)
        model.requires_grad_(False)
        self.consistency = consistency
        wanted = [
            name
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets
        ]
        if not wanted:
            raise PemaError(f"no linear layer named {list(targets)} in the model")
        for name in wanted:
            parent, _, attr = name.rpartition(".")
            base = model.get_submodule(name)
            assert isinstance(base, nn.Linear)
            setattr(model.get_submodule(parent), attr, MixLoRALinear(base, rank, alpha, mixture))

    def loss(self, batch: Batch) -> Tensor:
        """Mean CE of two passes with independent routing plus the consistency term on the
        target positions."""
        first = self.logits(batch.input_ids, batch.attention_mask)
        second = self.logits(batch.input_ids, batch.attention_mask)
        ce = 0.5 * (target_loss(first, batch.labels) + target_loss(second, batch.labels))
        if self.consistency == 0:
            return ce
        on_target = batch.labels[:, 1:] != IGNORE
        kl = symmetric_kl(first[:, :-1][on_target], second[:, :-1][on_target])
        return ce + self.consistency * kl

    def prepare_inference(self) -> None:
        """Replace every mixture by its weight-averaged single LoRA module."""
        for name, m in list(self.model.named_modules()):
            if isinstance(m, MixLoRALinear):
                parent, _, attr = name.rpartition(".")
                setattr(self.model.get_submodule(parent), attr, m.merged())
        self.model.requires_grad_(False)

    def inference_parameter_count(self) -> int:
        """Parameters of the served adaptation: M copies count as one after merging."""
        total = 0
        for m in self.model.modules():
            if isinstance(m, MixLoRALinear):
                total += m.A[0].numel() + m.B.numel()
            elif isinstance(m, LoRALinear):
                total += m.A.numel() + m.B.numel()
        return total
