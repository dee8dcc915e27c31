"""Supervised fine-tuning on (source, target) pairs, shared by every peer method.

The prompt is PromptFormat's (chat template + task template), exactly what PEMA sees, and the loss
covers target tokens only (the target ends with the end-of-turn token, as PEMA's memory values do).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache, PretrainedConfig

from pema.backbone import EncodeItem, left_pad, positions_from_mask
from pema.data import Pair
from pema.errors import PemaError
from pema.evaluation import Decoder, GenerationTrace, score, translate_with
from pema.generation import greedy_decode
from pema.prompts import PromptFormat
from pema.training import EarlyStop

IGNORE = -100


@dataclass
class Batch:
    """Right-padded rows; labels[i, t] is token t when it is a target token, else IGNORE."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor


def encode_pairs(fmt: PromptFormat, pairs: Sequence[Pair], max_tokens: int) -> list[EncodeItem]:
    """Prompt and target ids, the target cut so that a row fits in max_tokens (prompt kept whole)."""
    items = []
    for item in fmt.items(pairs):
        room = max_tokens - len(item.prompt)
        if room < 1:
            raise PemaError(f"a prompt of {len(item.prompt)} tokens leaves no room in {max_tokens}")
        items.append(EncodeItem(item.prompt, list(item.target[:room])))
    return items


def collate(items: Sequence[EncodeItem], pad_id: int) -> Batch:
    width = max(len(it.prompt) + len(it.target) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for i, it in enumerate(items):
        row = [*it.prompt, *it.target]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, len(it.prompt) : len(row)] = torch.tensor(list(it.target))
    return Batch(ids, mask, labels)


def per_row_target_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean CE over each row's target tokens (B values): the per-pair loss DP-SGD clips."""
    pred, gold = logits[:, :-1].float(), labels[:, 1:]
    ce = F.cross_entropy(pred.transpose(1, 2), gold, ignore_index=IGNORE, reduction="none")
    counts = (gold != IGNORE).sum(1).clamp(min=1)
    return ce.sum(1) / counts


def target_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean CE over all target tokens of the batch (position t predicts token t + 1)."""
    return F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE
    )


class Peer(nn.Module):
    """A causal LM with some trainable part; subclasses say what is trained and how it is served.

    `logits` takes left- or right-padded ids with explicit positions and an optional KV cache, so
    one greedy loop serves every method.
    """

    config: PretrainedConfig

    def logits(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor | None = None,
        cache: DynamicCache | None = None,
    ) -> Tensor:
        raise NotImplementedError

    def loss(self, batch: Batch) -> Tensor:
        return target_loss(self.logits(batch.input_ids, batch.attention_mask), batch.labels)

    def per_sample_loss(self, batch: Batch) -> Tensor:
        """One loss per row (pair), for DP-SGD: the mean of these is what Opacus expects."""
        return per_row_target_loss(self.logits(batch.input_ids, batch.attention_mask), batch.labels)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def prepare_inference(self) -> None:
        """Turn the trained state into the served one (merging, precomputing); default: nothing."""

    def inference_parameter_count(self) -> int:
        """Parameters that a served model adds to (or changes in) the frozen base model."""
        return sum(p.numel() for p in self.trainable())


class HFPeer(Peer):
    """A Hugging Face causal LM (plain, fully trainable, or wrapped by peft)."""

    def __init__(self, model: nn.Module, config: PretrainedConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config

    def logits(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor | None = None,
        cache: DynamicCache | None = None,
    ) -> Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
        return out.logits


@dataclass(frozen=True)
class SFTConfig:
    lr: float = 1e-4
    batch_size: int = 8
    epochs: int = 1
    max_tokens: int = 96
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.epochs < 1 or self.max_tokens < 2:
            raise PemaError("batch_size and epochs must be at least 1, max_tokens at least 2")
        if not self.lr > 0:
            raise PemaError(f"lr must be positive, got {self.lr}")


@dataclass
class SFTReport:
    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    privacy: dict[str, Any] | None = None
    epochs_run: int = 0
    best_epoch: int = 0  # the epoch whose weights were kept (0: no validation)
    valid_history: list[float] = field(default_factory=list)

    def seconds_per_epoch(self, epochs: int) -> float:
        return self.seconds / max(1, epochs)


@torch.no_grad()
def valid_loss(peer: Peer, items: Sequence[EncodeItem], pad_id: int, batch_size: int = 16) -> float:
    """Mean target-token CE over validation pairs (teacher-forced): what PEMA's early stopping
    reads off its validation memory, here for a peer."""
    was_training = peer.training
    peer.eval()
    total, count = 0.0, 0
    for i in range(0, len(items), batch_size):
        batch = collate(items[i : i + batch_size], pad_id)
        n = int((batch.labels[:, 1:] != IGNORE).sum())
        total += float(peer.loss(batch)) * n
        count += n
    peer.train(was_training)
    return total / max(count, 1)


def train_sft(
    peer: Peer,
    items: Sequence[EncodeItem],
    cfg: SFTConfig,
    pad_id: int,
    on_step: Callable[[int, float], None] | None = None,
    valid_items: Sequence[EncodeItem] | None = None,
) -> SFTReport:
    """AdamW on the peer's trainable parameters, shuffled mini-batches, `peer.loss` per batch.
    With `valid_items`, validates after every epoch, keeps the best epoch's weights and stops by
    PEMA's rule (pema.training.EarlyStop)."""
    if not items:
        raise PemaError("no training pairs")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    params = peer.trainable()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    report = SFTReport()
    stopper = EarlyStop()
    best = (float("inf"), [p.detach().clone() for p in params])
    peer.train()
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        perm = torch.randperm(len(items), generator=gen).tolist()
        for i in range(0, len(perm), cfg.batch_size):
            batch = collate([items[j] for j in perm[i : i + cfg.batch_size]], pad_id)
            loss = peer.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            report.steps += 1
            report.losses.append(float(loss.detach()))
            if on_step:
                on_step(report.steps, report.losses[-1])
        report.epochs_run = epoch
        if valid_items:
            loss_v = valid_loss(peer, valid_items, pad_id)
            report.valid_history.append(round(loss_v, 4))
            if loss_v < best[0]:
                best = (loss_v, [p.detach().clone() for p in params])
                report.best_epoch = epoch
            if stopper.should_stop(loss_v):
                break
    if valid_items:
        with torch.no_grad():
            for p, kept in zip(params, best[1], strict=True):
                p.copy_(kept)
    report.seconds = time.perf_counter() - start
    peer.eval()
    return report


@torch.no_grad()
def greedy_generate(
    peer: Peer,
    prompts: Sequence[Sequence[int]],
    stop_ids: frozenset[int],
    max_new_tokens: Sequence[int],
    pad_id: int,
) -> list[list[int]]:
    """Greedy decoding of left-padded prompts with a KV cache; each row stops at a stop token or
    its own cap. Positions count real tokens only, as in pema.backbone."""
    rows = len(prompts)
    ids, mask = left_pad(prompts, pad_id)
    positions = positions_from_mask(mask)
    cache = DynamicCache(config=peer.config)

    def step(next_ids: list[int], _t: int) -> Tensor:
        nonlocal mask, positions
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
        tokens = torch.tensor(next_ids, dtype=torch.long)[:, None]
        return peer.logits(tokens, mask, positions, cache)[:, -1]

    first = peer.logits(ids, mask, positions, cache)[:, -1]
    return greedy_decode(first, step, stop_ids, max_new_tokens)


def peer_decoder(peer: Peer, pad_id: int) -> Decoder:
    """A peer's own greedy decoding, in the shape pema.evaluation.translate_with expects."""

    def decode(
        prompts: list[list[int]],
        _sources: list[list[int]],
        _lengths: list[int],
        caps: list[int],
        stop_ids: frozenset[int],
    ) -> list[list[int]]:
        return greedy_generate(peer, prompts, stop_ids, caps, pad_id)

    return decode


def pad_id_of(fmt: PromptFormat) -> int:
    pad_id = fmt.tokenizer.pad_token_id
    return int(pad_id) if pad_id is not None else fmt.eos_id


def translate_peer(
    peer: Peer,
    fmt: PromptFormat,
    sources: Sequence[str],
    rho: float,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
    trace: GenerationTrace | None = None,
) -> list[str]:
    """Greedy outputs through pema.evaluation.translate_with: PEMA's prompts, cap and stop rule."""
    peer.eval()
    return translate_with(
        peer_decoder(peer, pad_id_of(fmt)), fmt, sources, rho, batch_size, progress, trace
    )


def evaluate_peer(
    peer: Peer, fmt: PromptFormat, pairs: Sequence[Pair], rho: float, batch_size: int = 16
) -> dict[str, Any]:
    hyps = translate_peer(peer, fmt, [p.source for p in pairs], rho, batch_size)
    return {**score(hyps, [p.target for p in pairs]), "n": len(pairs), "outputs": hyps}
