"""Private training with Opacus: DP-SGD for the PEMA adapter and for the peers (SLaSh, JR-WARP).

Privacy unit: one training pair (a verse). Each sample Opacus clips is a whole pair: for PEMA all
of a pair's keys form one sample, so the guarantee covers the verse, not a single token (per-key DP
would protect one target token while the verse's other keys leak it). N is the number of pairs,
δ = 1/(2N), batches are Poisson-sampled with rate q = batch/N, and the noise multiplier is
calibrated by Opacus (make_private_with_epsilon) to the target ε for the planned epochs. Training
runs a fixed number of epochs (no early stopping: the accountant is calibrated to them), and the
reported ε is the RDP accountant's for the steps actually taken.

Per-sample gradients come from Opacus' GradSampleModule: layers it does not know (the PEMA core,
ZSource) fall back to its functorch path, which replays the module's forward per sample. That is
why DP-PEMA trains without input dropout (a replayed pass would draw a different mask) and
without AdaMix routing (same reason), and why the loss is a plain per-pair CE on small chunks of
pairs rather than pema.head's chunked custom-autograd CE: the gradient Opacus captures is the one
at the core's output, and per-pair weighting needs per-row losses.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from pema.adapter import PemaAdapter
from pema.backbone import EncodeItem
from pema.errors import PemaError
from pema.head import LMHead
from pema.memory import Memory
from pema.peers.sft import Peer, SFTConfig, SFTReport, collate
from pema.training import (
    Callback,
    PhaseReport,
    PriorMasks,
    TrainConfig,
    TrainEvent,
    TrainReport,
    evaluate_memory,
)

IGNORE = -100


def _engine_setup(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    n: int,
    batch_size: int,
    epsilon: float,
    epochs: int,
    max_grad_norm: float,
) -> tuple[PrivacyEngine, Any, DataLoader, float]:
    """Opacus' engine over an index dataset of n samples; returns (engine, DP optimizer, Poisson
    loader, δ)."""
    delta = 1.0 / (2 * n)
    loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch_size)
    engine = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        # Opacus warns about the secure RNG and the "trainable modules" it cannot validate.
        warnings.simplefilter("ignore")
        _, dp_opt, dp_loader = engine.make_private_with_epsilon(
            module=module,
            optimizer=optimizer,
            data_loader=loader,
            target_epsilon=epsilon,
            target_delta=delta,
            epochs=epochs,
            max_grad_norm=max_grad_norm,
        )
    return engine, dp_opt, dp_loader, delta


def _privacy(
    engine: PrivacyEngine, dp_opt: Any, delta: float, n: int, batch: int, steps: int, clip: float
) -> dict[str, float | int | str]:
    return {
        "unit": "pair",
        "target_delta": delta,
        "epsilon_spent": round(float(engine.get_epsilon(delta)), 4),
        "noise_multiplier": round(float(dp_opt.noise_multiplier), 4),
        "max_grad_norm": clip,
        "sample_rate": round(batch / n, 6),
        "steps": steps,
        "n": n,
    }


class _AdapterCore(nn.Module):
    """A and B_pd of the adapter (the same Parameter objects): the part Opacus replays per sample.
    forward(x) = [x +] s · B_pd A x on prepared keys x, shape (pairs, keys, d)."""

    def __init__(self, adapter: PemaAdapter) -> None:
        super().__init__()
        self.A = adapter.A
        self.B_pd = adapter.B_pd
        self.scaling = adapter.config.scaling
        self.residual = adapter.config.variant == "residual"

    def forward(self, x: Tensor) -> Tensor:
        h = self.scaling * (x @ self.A.T) @ self.B_pd.T
        return x + h if self.residual else h


def _pair_batch(memory: Memory, pairs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Keys (P x T x d), targets (P x T, IGNORE on padding) and memory rows (P x T, 0 on
    padding) of the given pairs."""
    offsets = memory.offsets
    spans = [(int(offsets[p]), int(offsets[p + 1])) for p in pairs.tolist()]
    width = max(b - a for a, b in spans)
    keys = torch.zeros(len(spans), width, memory.keys.shape[1], dtype=memory.keys.dtype)
    targets = torch.full((len(spans), width), IGNORE, dtype=torch.long)
    rows = torch.zeros((len(spans), width), dtype=torch.long)
    for i, (a, b) in enumerate(spans):
        keys[i, : b - a] = memory.keys[a:b]
        targets[i, : b - a] = memory.targets[a:b].long()
        rows[i, : b - a] = torch.arange(a, b)
    return keys, targets, rows


def _per_pair_ce(head: LMHead, h: Tensor, targets: Tensor, shift: Tensor | float = 0.0) -> Tensor:
    """Sum over pairs of each pair's mean CE over its keys (plain autograd); `shift` (P x T x V,
    the source priors' fixed logits) moves each key's logits."""
    logits = head(h) + shift
    ce = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    return (ce.sum(1) / (targets != IGNORE).sum(1).clamp(min=1)).sum()


def train_adapter_private(
    adapter: PemaAdapter,
    head: LMHead,
    train_memory: Memory,
    valid_memory: Memory,
    cfg: TrainConfig,
    callback: Callback | None = None,
    chunk_pairs: int = 4,
    sources: tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]] | None = None,
) -> TrainReport:
    """Phase 2 only (κ = 0), DP-SGD with Adam over A and B_pd for cfg.epochs epochs. A source
    prior keeps its starting β (a fixed setting, not learned from the data under DP)."""
    assert cfg.dp_epsilon is not None
    config = adapter.config
    if config.kappa != 0:
        raise PemaError("DP training supports κ = 0 only (no reconstruction phase)")
    if config.mixture != 1:
        raise PemaError("DP training does not support a mixture adapter (pema-mix)")
    if cfg.epochs < 1:
        raise PemaError("DP training needs at least one epoch")
    n = train_memory.n_pairs
    train_src, valid_src = sources if sources is not None else (None, None)
    priors = PriorMasks(adapter, head, train_memory, train_src)
    for beta in (adapter.source_beta, adapter.copy_beta):
        if beta is not None:
            beta.requires_grad_(False)
    head.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    adapter.B_rct.requires_grad_(False)
    core = _AdapterCore(adapter)
    optimizer = torch.optim.Adam([adapter.A, adapter.B_pd], lr=cfg.lr)
    batch = min(cfg.dp_batch_pairs, n)
    engine, dp_opt, loader, delta = _engine_setup(
        core, optimizer, n, batch, cfg.dp_epsilon, cfg.epochs, cfg.dp_max_grad_norm
    )
    report = PhaseReport()
    steps_per_epoch = len(loader)
    start = time.perf_counter()
    adapter.train()
    for epoch in range(1, cfg.epochs + 1):
        for (pairs,) in loader:
            dp_opt.zero_grad(set_to_none=True)
            if len(pairs) == 0:
                # An empty Poisson batch still costs a (noise-only) step, as the accountant assumes.
                for p in (adapter.A, adapter.B_pd):
                    p.grad_sample = torch.zeros(0, *p.shape)  # type: ignore[attr-defined]
                dp_opt.step()
                report.steps += 1
                continue
            keys, targets, rows = _pair_batch(train_memory, pairs)
            h = core(adapter.prepare(keys))

            def chunk_ce(h_chunk: Tensor, t_chunk: Tensor, r_chunk: Tensor) -> Tensor:
                # The priors' logits are made here, so that only one chunk's are ever held.
                shift = adapter.prior_logits(priors(r_chunk.flatten()))
                if isinstance(shift, Tensor):
                    shift = shift.detach().view(*r_chunk.shape, -1)
                return _per_pair_ce(head, h_chunk, t_chunk, shift)

            # Chunks of pairs through the V-wide head, recomputed in backward: peak memory is one
            # chunk of logits. The mean over the batch is the reduction Opacus is told about.
            parts = [
                checkpoint(
                    chunk_ce,
                    h[i : i + chunk_pairs],
                    targets[i : i + chunk_pairs],
                    rows[i : i + chunk_pairs],
                    use_reentrant=False,
                )
                for i in range(0, len(pairs), chunk_pairs)
            ]
            loss = torch.stack(parts).sum() / len(pairs)
            loss.backward()
            dp_opt.step()
            report.steps += 1
            if callback:
                callback(TrainEvent(2, "step", epoch, report.steps, steps_per_epoch, float(loss)))
        report.epochs_run = epoch
    report.seconds = time.perf_counter() - start
    adapter.B_rct.requires_grad_(True)
    adapter.eval()
    valid = evaluate_memory(
        adapter, head, valid_memory, with_model_baseline=True, sources=valid_src
    )
    report.best_valid = valid["loss"]
    report.history.append({"epoch": report.epochs_run, "step": report.steps, **valid})
    privacy = _privacy(engine, dp_opt, delta, n, batch, report.steps, cfg.dp_max_grad_norm)
    return TrainReport(phases={2: report}, valid=valid, privacy=privacy)


def train_peer_private(
    peer: Peer,
    items: Sequence[EncodeItem],
    cfg: SFTConfig,
    pad_id: int,
    epsilon: float,
    max_grad_norm: float = 1.0,
) -> SFTReport:
    """DP-SGD (AdamW) on a peer whose trainable modules Opacus can sample per row (SLaSh and
    JR-WARP: ZSource). One sample = one pair; cfg.batch_size is the expected Poisson batch."""
    n = len(items)
    if n == 0:
        raise PemaError("no training pairs")
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(peer.trainable(), lr=cfg.lr, weight_decay=0.0)
    batch = min(cfg.batch_size, n)
    engine, dp_opt, loader, delta = _engine_setup(
        peer, optimizer, n, batch, epsilon, cfg.epochs, max_grad_norm
    )
    report = SFTReport()
    peer.train()
    start = time.perf_counter()
    for _ in range(cfg.epochs):
        for (rows,) in loader:
            dp_opt.zero_grad(set_to_none=True)
            if len(rows) == 0:
                for p in peer.trainable():
                    p.grad_sample = torch.zeros(0, *p.shape)  # type: ignore[attr-defined]
                dp_opt.step()
                report.steps += 1
                continue
            loss = peer.per_sample_loss(collate([items[i] for i in rows.tolist()], pad_id)).mean()
            loss.backward()
            dp_opt.step()
            report.steps += 1
            report.losses.append(float(loss.detach()))
    report.seconds = time.perf_counter() - start
    peer.eval()
    report.privacy = _privacy(engine, dp_opt, delta, n, batch, report.steps, max_grad_norm)
    return report
