"""Two-phase PEMA training on an external memory, with early stopping on a validation memory."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from pema.adapter import PemaAdapter
from pema.dtypes import resolve_dtype
from pema.errors import PemaError
from pema.head import LMHead
from pema.memory import Memory
from pema.source_prior import NO_COPY, SourcePrior, copy_ids, end_tokens, source_mask


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-3
    rct_batch_size: int = 20480
    batch_size: int = 2048
    rct_epochs: int = 5
    epochs: int = 20
    eval_every: int = 100  # optimizer steps between validations (and at each epoch end)
    seed: int = 0
    ce_chunk_size: int = 256
    head_matmul_dtype: str = "auto"  # "bfloat16" or "float32"; auto: the faster one here
    # DP-SGD (pema.peers.private): a target ε turns it on; the privacy unit is a training pair.
    dp_epsilon: float | None = None
    dp_max_grad_norm: float = 1.0
    dp_batch_pairs: int = 32  # expected pairs per Poisson-sampled batch
    # Learn the source priors' β and γ (else they stay at their AdapterConfig starts, settings).
    learn_source_prior: bool = True
    # Wall-clock cap per phase: a phase stops at its first validation after this many seconds
    # (best checkpoint kept, PhaseReport.out_of_time set). None: epochs and early stopping only.
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("rct_batch_size", "batch_size", "eval_every", "ce_chunk_size"):
            if getattr(self, name) < 1:
                raise PemaError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.rct_epochs < 0 or self.epochs < 0:
            raise PemaError("epochs must not be negative")
        if self.head_matmul_dtype not in ("auto", "bfloat16", "float32"):
            raise PemaError(
                f"head_matmul_dtype must be auto, bfloat16 or float32, got {self.head_matmul_dtype}"
            )
        if not self.lr > 0:
            raise PemaError(f"lr must be positive, got {self.lr}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise PemaError(f"time_budget_s must be positive, got {self.time_budget_s}")
        if self.dp_epsilon is not None and not self.dp_epsilon > 0:
            raise PemaError(f"dp_epsilon must be positive, got {self.dp_epsilon}")
        if not self.dp_max_grad_norm > 0 or self.dp_batch_pairs < 1:
            raise PemaError("dp_max_grad_norm must be positive and dp_batch_pairs at least 1")


@dataclass
class TrainEvent:
    """A progress report: `kind` is "step" (after an optimizer step) or "valid" (a validation)."""

    phase: int
    kind: str
    epoch: int
    step: int
    steps_per_epoch: int
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class PhaseReport:
    steps: int = 0
    epochs_run: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    out_of_time: bool = False  # stopped by TrainConfig.time_budget_s
    best_valid: float = math.inf
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class TrainReport:
    phases: dict[int, PhaseReport]
    valid: dict[str, float]
    privacy: dict[str, float | int | str] | None = None  # DP training: the accountant's figures

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.phases.values())


Callback = Callable[[TrainEvent], None]


def symmetric_kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """AdaMix's consistency term ½ [KL(sg(p) ‖ q) + KL(sg(q) ‖ p)], averaged over rows."""
    lp, lq = F.log_softmax(logits_p.float(), -1), F.log_softmax(logits_q.float(), -1)
    kl_pq = F.kl_div(lq, lp.detach(), log_target=True, reduction="batchmean")
    kl_qp = F.kl_div(lp, lq.detach(), log_target=True, reduction="batchmean")
    return 0.5 * (kl_pq + kl_qp)


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[Tensor]:
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch_size):
        yield perm[i : i + batch_size]


class EarlyStop:
    """The reference rule: stop when a validation loss exceeds both previous ones. PEMA and every
    peer method stop by this one rule, so their training budgets match."""

    def __init__(self) -> None:
        self.history: list[float] = []

    def should_stop(self, loss: float) -> bool:
        self.history.append(loss)
        return len(self.history) >= 3 and loss > self.history[-2] and loss > self.history[-3]


class PriorMasks:
    """The source priors of any memory rows (None when the adapter has none): each key's pair's
    source mask, and the copy token its gold prefix leads to."""

    def __init__(
        self,
        adapter: PemaAdapter,
        head: LMHead,
        memory: Memory,
        sources: Sequence[Sequence[int]] | None,
    ) -> None:
        self.sources, self.vocab_size = sources, head.vocab_size
        self.pairs: Tensor | None = None
        self.copy = torch.zeros(0, dtype=torch.long)
        if adapter.has_prior:
            if sources is None or len(sources) != memory.n_pairs:
                raise PemaError(
                    "an adapter with a source prior trains with each memory pair's source tokens"
                )
            self.pairs = memory.pair_index()
            if adapter.copy_beta is not None:
                bounds = memory.offsets.tolist()
                self.copy = torch.tensor(
                    [
                        c
                        for p, src in enumerate(sources)
                        for c in copy_ids(src, memory.targets[bounds[p] : bounds[p + 1]].tolist())
                    ],
                    dtype=torch.long,
                )

    def __call__(self, rows: Tensor) -> SourcePrior | None:
        if self.pairs is None or self.sources is None:
            return None
        sources = [self.sources[p] for p in self.pairs[rows].tolist()]
        tokens = self.copy[rows] if len(self.copy) else torch.full((len(rows),), NO_COPY)
        return SourcePrior(source_mask(sources, self.vocab_size), tokens, end_tokens(sources))


@torch.no_grad()
def evaluate_memory(
    adapter: PemaAdapter,
    head: LMHead,
    memory: Memory,
    batch_size: int = 256,
    with_model_baseline: bool = False,
    sources: Sequence[Sequence[int]] | None = None,
) -> dict[str, float]:
    """Validation figures: reconstruction MSE, CE and top-1 of P_PEMA and the joint loss; with
    `with_model_baseline`, also the frozen model's own CE and top-1 on the same keys. Batches are
    small because each holds batch x V fp32 logits (50 MB at 256 x 49,152): validation must not
    set the tenant's peak memory."""
    was_training = adapter.training
    adapter.eval()
    n = len(memory)
    sums = {"mse": 0.0, "ce": 0.0, "top1": 0.0, "model_ce": 0.0, "model_top1": 0.0}

    def add_logits(prefix: str, logits: Tensor, targets: Tensor) -> None:
        logp = torch.log_softmax(logits, dim=-1)
        sums[prefix + "ce"] -= float(logp.gather(1, targets[:, None]).sum())
        sums[prefix + "top1"] += float((logp.argmax(-1) == targets).sum())

    priors = PriorMasks(adapter, head, memory, sources)
    for i in range(0, n, batch_size):
        rows = torch.arange(i, min(i + batch_size, n))
        keys, targets = memory.keys[rows], memory.targets[rows].long()
        x = adapter.prepare(keys)
        z = adapter.bottleneck(x)
        sums["mse"] += float(F.mse_loss(adapter.reconstruct(x, z), x, reduction="sum")) / x.shape[1]
        add_logits("", adapter.logits(head, adapter.predict_hidden(x, z), priors(rows)), targets)
        if with_model_baseline:
            add_logits("model_", head(keys.float()), targets)
    adapter.train(was_training)
    out = {k: v / n for k, v in sums.items() if with_model_baseline or not k.startswith("model_")}
    out["loss"] = adapter.config.kappa * out["mse"] + (1 - adapter.config.kappa) * out["ce"]
    return out


def _run_phase(
    phase: int,
    adapter: PemaAdapter,
    params: list[torch.nn.Parameter],
    loss_fn: Callable[[Tensor], Tensor],
    valid_fn: Callable[[], dict[str, float]],
    memory: Memory,
    batch_size: int,
    epochs: int,
    cfg: TrainConfig,
    callback: Callback | None,
) -> PhaseReport:
    report = PhaseReport()
    if epochs == 0:
        return report
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + phase)
    stopper = EarlyStop()
    best_state = copy.deepcopy(adapter.state_dict())
    steps_per_epoch = math.ceil(len(memory) / batch_size)
    start = time.perf_counter()

    def validate(epoch: int) -> bool:
        metrics = valid_fn()
        report.history.append({"epoch": epoch, "step": report.steps, **metrics})
        if metrics["loss"] < report.best_valid:
            report.best_valid = metrics["loss"]
            best_state.update(copy.deepcopy(adapter.state_dict()))
        if callback:
            callback(
                TrainEvent(
                    phase, "valid", epoch, report.steps, steps_per_epoch, metrics["loss"], metrics
                )
            )
        if stopper.should_stop(metrics["loss"]):
            return True
        report.out_of_time = (
            cfg.time_budget_s is not None and time.perf_counter() - start > cfg.time_budget_s
        )
        return report.out_of_time

    adapter.train()
    stop = False
    for epoch in range(1, epochs + 1):
        for idx in _batches(len(memory), batch_size, gen):
            loss = loss_fn(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            loss = loss.detach()
            opt.step()
            report.steps += 1
            if callback:
                callback(
                    TrainEvent(phase, "step", epoch, report.steps, steps_per_epoch, float(loss))
                )
            if report.steps % cfg.eval_every == 0 and validate(epoch):
                stop = True
                break
        report.epochs_run = epoch
        if stop or (report.steps % cfg.eval_every != 0 and validate(epoch)):
            report.stopped_early = not report.out_of_time
            break
    adapter.load_state_dict(best_state)
    adapter.eval()
    report.seconds = time.perf_counter() - start
    return report


def train_adapter(
    adapter: PemaAdapter,
    head: LMHead,
    train_memory: Memory,
    valid_memory: Memory,
    cfg: TrainConfig = TrainConfig(),
    callback: Callback | None = None,
    phases: tuple[int, ...] = (1, 2),
    sources: tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]] | None = None,
) -> TrainReport:
    """Phase 1 trains A, B_rct to reconstruct keys; phase 2 freezes B_rct and trains a fresh A
    with B_pd on κ·MSE + (1-κ)·CE. Phase 1 is skipped when κ = 0 (its B_rct would be unused).
    `phases` lets a federated round continue phase 2 from a checkpoint.
    With adapter.config.mixture > 1 (AdaMix), every step runs two passes with independent routing
    and adds the symmetric-KL consistency term. With cfg.dp_epsilon set, training is DP-SGD.
    `sources` (each pair's PromptFormat.prior_ids, for the train and the valid memory) feed an
    adapter's source prior."""
    train_src, valid_src = sources if sources is not None else (None, None)
    if cfg.dp_epsilon is not None:
        # Imported here because pema.peers.private builds on this module.
        from pema.peers.private import train_adapter_private

        return train_adapter_private(
            adapter, head, train_memory, valid_memory, cfg, callback, sources=sources
        )
    if len(train_memory) == 0 or len(valid_memory) == 0:
        raise PemaError("training and validation memories must not be empty")
    if train_memory.keys.shape[1] != adapter.config.hidden_size:
        raise PemaError(
            f"memory keys have width {train_memory.keys.shape[1]}, adapter expects "
            f"{adapter.config.hidden_size}"
        )
    head.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    kappa = adapter.config.kappa
    matmul_dtype = resolve_dtype(cfg.head_matmul_dtype)
    reports: dict[int, PhaseReport] = {}

    priors = PriorMasks(adapter, head, train_memory, train_src)

    def valid() -> dict[str, float]:
        return evaluate_memory(adapter, head, valid_memory, sources=valid_src)

    def rct_loss(idx: Tensor) -> Tensor:
        x = adapter.prepare(train_memory.keys[idx])
        return F.mse_loss(adapter.reconstruct(x), x)

    def rct_valid() -> dict[str, float]:
        m = valid()
        return {**m, "loss": m["mse"]}

    def mixture_loss(x: Tensor, targets: Tensor, prior: SourcePrior | None) -> Tensor:
        # Full logits (not the chunked CE) because the KL term needs both distributions.
        zs = [adapter.bottleneck(x) for _ in range(2)]
        logits = [adapter.logits(head, adapter.predict_hidden(x, z), prior) for z in zs]
        ce = 0.5 * (F.cross_entropy(logits[0], targets) + F.cross_entropy(logits[1], targets))
        loss = ce + adapter.config.mixture_consistency * symmetric_kl(logits[0], logits[1])
        if kappa == 0:
            return loss
        mse = sum(F.mse_loss(adapter.reconstruct(x, z), x) for z in zs) / 2
        return kappa * mse + (1 - kappa) * loss

    def joint_loss(idx: Tensor) -> Tensor:
        x, targets = adapter.prepare(train_memory.keys[idx]), train_memory.targets[idx].long()
        prior = priors(idx)
        if adapter.A_mix is not None:
            return mixture_loss(x, targets, prior)
        z = adapter.bottleneck(x)
        if prior is not None:
            # The prior shifts every logit row: the full logits, not the chunked CE.
            ce = F.cross_entropy(adapter.logits(head, adapter.predict_hidden(x, z), prior), targets)
        else:
            ce = head.cross_entropy(
                adapter.predict_hidden(x, z), targets, cfg.ce_chunk_size, matmul_dtype
            )
        if kappa == 0:
            return ce
        return kappa * F.mse_loss(adapter.reconstruct(x, z), x) + (1 - kappa) * ce

    if 1 in phases and kappa > 0:
        reports[1] = _run_phase(
            1, adapter, [adapter.trainable_A(), adapter.B_rct], rct_loss, rct_valid,
            train_memory, cfg.rct_batch_size, cfg.rct_epochs, cfg, callback,
        )  # fmt: skip
    if 2 in phases:
        if 1 in phases:
            adapter.reset_A()
        adapter.B_rct.requires_grad_(False)
        params = [adapter.trainable_A(), adapter.B_pd]
        for beta in (adapter.source_beta, adapter.copy_beta):
            if beta is not None:
                beta.requires_grad_(cfg.learn_source_prior)
                if cfg.learn_source_prior:
                    params.append(beta)
        reports[2] = _run_phase(
            2, adapter, params, joint_loss, valid,
            train_memory, cfg.batch_size, cfg.epochs, cfg, callback,
        )  # fmt: skip
        adapter.B_rct.requires_grad_(True)
    return TrainReport(
        phases=reports,
        valid=evaluate_memory(
            adapter, head, valid_memory, with_model_baseline=True, sources=valid_src
        ),
    )
