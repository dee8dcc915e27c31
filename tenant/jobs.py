"""The tenant's workflows (build memory, train, evaluate), shared by the CLI, the Flower client
and the benchmarks. Progress goes to tqdm bars on stderr."""

from __future__ import annotations

import copy
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from pema.adapter import AdapterConfig, PemaAdapter, load_adapter, save_adapter
from pema.backbone import EncodeItem, MemoryMode
from pema.data import Pair, pair_origin
from pema.errors import DataError
from pema.evaluation import choose_source_prior, keep_if_better, score, translate
from pema.generation import Mixing, token_ratio
from pema.memory import Memory, MemorySpec, build_memory, memory_spec
from pema.process import peak_rss_bytes
from pema.prompts import PromptFormat
from pema.settings import PriorChoice, prior_label
from pema.training import (
    Callback,
    TrainConfig,
    TrainEvent,
    TrainReport,
    evaluate_memory,
    train_adapter,
)
from tenant.backend import Backend
from tenant.memory_store import ShardedMemoryStore

log = logging.getLogger(__name__)


def _advance(bar: tqdm) -> Callable[[int], None]:
    """A progress callback for a tqdm bar (whose update returns a flag callbacks do not have)."""

    def update(n: int) -> None:
        bar.update(n)

    return update


def check_lengths(items: Sequence[EncodeItem], pairs: Sequence[Pair], max_length: int) -> None:
    """Refuse a pair whose prompt + target exceed the model's limit before any encoding, naming
    its file line (the backbone only knows its position in one shard's batch)."""
    for i, item in enumerate(items):
        total = len(item.prompt) + len(item.target)
        if total > max_length:
            raise DataError(
                f"{pair_origin(pairs, i)}: {total} tokens (prompt + target) exceed the model's "
                f"limit of {max_length}"
            )


@dataclass
class MemoryResult:
    memory: Memory
    seconds: float
    cache_hit: bool


class MemoryCache:
    """Memories kept in this process between jobs (the tenant's worker), the `slots` most
    recently used. A memory's address names all it was built from (model revision, pairs,
    template, mode), so a kept memory is never stale."""

    def __init__(self, slots: int = 4) -> None:
        self.slots = slots
        self.misses = 0  # memories asked for that were not kept (loaded or built instead)
        self._kept: OrderedDict[tuple[str, str], Memory] = OrderedDict()

    def get(self, tenant: str, address: str) -> Memory | None:
        memory = self._kept.get((tenant, address))
        if memory is None:
            self.misses += 1
        else:
            self._kept.move_to_end((tenant, address))
        return memory

    def put(self, tenant: str, memory: Memory) -> None:
        self._kept[(tenant, memory.spec.address)] = memory
        self._kept.move_to_end((tenant, memory.spec.address))
        while len(self._kept) > self.slots:
            self._kept.popitem(last=False)


def obtain_memory(
    backend: Backend,
    fmt: PromptFormat,
    pairs: Sequence[Pair],
    mode: MemoryMode,
    store: ShardedMemoryStore | None,
    tenant: str = "local",
    desc: str = "memory",
    quiet: bool = False,
    kept: MemoryCache | None = None,
) -> MemoryResult:
    """The memory for these pairs: kept in this process, else from the store when present, else
    built (and stored)."""
    spec = memory_spec(backend.backbone.info, pairs, fmt.template, mode)
    start = time.perf_counter()
    memory = kept.get(tenant, spec.address) if kept is not None else None
    if memory is None and store is not None:
        memory = store.get(tenant, spec)
    hit = memory is not None
    if memory is None:
        memory = _build_memory(backend, fmt, pairs, spec, mode, store, tenant, desc, quiet)
    if kept is not None:
        kept.put(tenant, memory)
    return MemoryResult(memory, time.perf_counter() - start, hit)


def _build_memory(
    backend: Backend,
    fmt: PromptFormat,
    pairs: Sequence[Pair],
    spec: MemorySpec,
    mode: MemoryMode,
    store: ShardedMemoryStore | None,
    tenant: str,
    desc: str,
    quiet: bool,
) -> Memory:
    items = fmt.items(pairs)
    check_lengths(items, pairs, backend.backbone.info.max_length)
    with tqdm(
        total=len(items), desc=f"building {desc} ({mode.value})", unit="pair", disable=quiet
    ) as bar:
        if store is None:
            return build_memory(backend.backbone, items, spec, progress=_advance(bar))

        # Shard-wise, so an interrupted build resumes from the shards already stored.
        def build_part(lo: int, hi: int) -> Memory:
            return build_memory(backend.backbone, items[lo:hi], spec, progress=_advance(bar))

        return store.build(tenant, spec, len(items), build_part)


class TrainProgress:
    """tqdm bars for both phases; validations are printed as lines."""

    def __init__(self, cfg: TrainConfig, quiet: bool = False) -> None:
        self.cfg = cfg
        self.quiet = quiet
        self.bar: tqdm | None = None
        self.phase = 0

    def __call__(self, e: TrainEvent) -> None:
        if self.quiet:
            return
        if e.phase != self.phase:
            self.close()
            self.phase = e.phase
            epochs = self.cfg.rct_epochs if e.phase == 1 else self.cfg.epochs
            name = "phase 1 (reconstruction)" if e.phase == 1 else "phase 2 (joint)"
            self.bar = tqdm(total=epochs * e.steps_per_epoch, desc=name, unit="step")
        assert self.bar is not None
        if e.kind == "step":
            self.bar.update(1)
            self.bar.set_postfix(epoch=e.epoch, loss=f"{e.loss:.4f}")
        else:
            shown = " ".join(f"{k}={v:.4f}" for k, v in e.metrics.items())
            self.bar.write(f"  phase {e.phase} epoch {e.epoch} step {e.step}: valid {shown}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@dataclass
class TrainOutcome:
    adapter: PemaAdapter
    report: TrainReport
    train_memory: MemoryResult
    valid_memory: MemoryResult
    peak_rss_bytes: int
    summary: dict[str, Any] = field(default_factory=dict)


def train_job(
    backend: Backend,
    train_pairs: Sequence[Pair],
    valid_pairs: Sequence[Pair],
    adapter_config: AdapterConfig,
    train_config: TrainConfig,
    out_dir: Path | None,
    store: ShardedMemoryStore | None,
    tenant: str = "local",
    quiet: bool = False,
    start_state: dict[str, Tensor] | None = None,
    phases: tuple[int, ...] = (1, 2),
    on_event: Callback | None = None,
    kept: MemoryCache | None = None,
    prior_choice: PriorChoice | None = None,
) -> TrainOutcome:
    """Build (or load) both memories, train an adapter, and save it atomically to out_dir.

    A federated round passes `start_state` (its last checkpoint or its group's average) and
    `phases=(2,)` to continue training; `on_event` sees every training event (metrics); `kept`
    holds memories between jobs (the tenant's worker); `prior_choice` picks the source priors on
    the valid pairs before training, and after it keeps the trained adapter only if it generates
    better there than its start (else the start is saved: the summary's "kept" says which)."""
    fmt = PromptFormat(backend.tokenizer, adapter_config.template)
    mode = MemoryMode(adapter_config.memory_mode)
    train_mem = obtain_memory(
        backend, fmt, train_pairs, mode, store, tenant, "train memory", quiet, kept
    )
    # Validation keys are always teacher-forced: they measure next-token prediction of gold text.
    valid_mem = obtain_memory(
        backend, fmt, valid_pairs, MemoryMode.TEACHER_FORCED, store, tenant, "valid memory", quiet,
        kept,
    )  # fmt: skip
    rho = token_ratio(
        [len(fmt.text_ids(p.source)) for p in train_pairs],
        [len(fmt.target_ids(p.target)) for p in train_pairs],
    )
    config = adapter_config.replace(
        hidden_size=backend.backbone.info.hidden_size,
        rho=rho,
        model_revision=backend.backbone.info.revision,
    )
    head = backend.backbone.head()
    sources = (
        [fmt.prior_ids(p.source) for p in train_pairs],
        [fmt.prior_ids(p.source) for p in valid_pairs],
    )
    prior_chrf: dict[tuple[float, float], float] = {}
    if prior_choice is not None:
        config, prior_chrf = choose_source_prior(
            prior_choice, config, backend.backbone, fmt, valid_pairs
        )
    # Seeded, so that tenants averaged together start from the same initial adapter.
    torch.manual_seed(train_config.seed)
    adapter = PemaAdapter(config)
    if start_state is not None:
        adapter.load_state_dict(start_state)
    # The gate after training may put this start back.
    initial = copy.deepcopy(adapter.state_dict()) if prior_choice is not None else {}
    progress = TrainProgress(train_config, quiet)

    def callback(event: TrainEvent) -> None:
        progress(event)
        if on_event is not None:
            on_event(event)

    try:
        report = train_adapter(
            adapter,
            head,
            train_mem.memory,
            valid_mem.memory,
            train_config,
            callback,
            phases,
            sources=sources,
        )
    finally:
        progress.close()
    summary = {
        "model": backend.backbone.info.name,
        "train_pairs": len(train_pairs),
        "train_keys": len(train_mem.memory),
        "valid_keys": len(valid_mem.memory),
        "memory_build_seconds": round(train_mem.seconds + valid_mem.seconds, 2),
        "memory_cache_hit": train_mem.cache_hit and valid_mem.cache_hit,
        "train_seconds": round(report.seconds, 2),
        "steps": {str(k): v.steps for k, v in report.phases.items()},
        "valid": {k: round(v, 5) for k, v in report.valid.items()},
        "train_config": vars(train_config),
    }
    if prior_choice is not None:
        summary["source_prior_valid_chrf"] = {
            prior_label(*g): round(c, 2) for g, c in prior_chrf.items()
        }
    if prior_choice is not None and prior_chrf:
        gate = keep_if_better(
            prior_choice,
            adapter,
            initial,
            backend.backbone,
            fmt,
            valid_pairs,
        )
        if gate["kept"] == "start":
            # The figures describe the adapter saved; the discarded one's stay beside them.
            summary["trained_valid"] = summary["valid"]
            start_valid = evaluate_memory(
                adapter, head, valid_mem.memory, with_model_baseline=True, sources=sources[1]
            )
            summary["valid"] = {k: round(v, 5) for k, v in start_valid.items()}
        summary["valid_chrf"] = {k: gate[k] for k in ("start", "trained", "interval")}
        summary["kept"] = gate["kept"]
    if out_dir is not None:
        save_adapter(adapter, out_dir, extra={"training": summary})
    return TrainOutcome(adapter, report, train_mem, valid_mem, peak_rss_bytes(), summary)


def load_job_adapter(backend: Backend, adapter_dir: Path) -> PemaAdapter:
    adapter, _ = load_adapter(adapter_dir, model_revision=backend.backbone.info.revision)
    return adapter


def evaluate_job(
    backend: Backend,
    adapter: PemaAdapter,
    pairs: Sequence[Pair],
    mixing: Mixing | None = None,
    include_untuned: bool = True,
    batch_size: int = 16,
    quiet: bool = False,
) -> dict[str, Any]:
    """BLEU/chrF of the adapter (and of the untuned model) on the given pairs."""
    cfg = adapter.config
    fmt = PromptFormat(backend.tokenizer, cfg.template)
    mixing = mixing or Mixing(cfg.lambda_max, cfg.schedule)
    sources = [p.source for p in pairs]
    refs = [p.target for p in pairs]
    result: dict[str, Any] = {
        "n": len(pairs),
        "lambda_max": mixing.lambda_max,
        "schedule": mixing.schedule,
    }
    if include_untuned:
        with tqdm(total=len(pairs), desc="generating (untuned)", unit="pair", disable=quiet) as bar:
            base = translate(
                backend.backbone,
                fmt,
                sources,
                rho=cfg.rho,
                batch_size=batch_size,
                progress=_advance(bar),
            )
        s = score(base, refs)
        result.update(untuned_bleu=s["bleu"], untuned_chrf=s["chrf"], untuned_outputs=base)
    with tqdm(total=len(pairs), desc="generating (PEMA)", unit="pair", disable=quiet) as bar:
        hyps = translate(
            backend.backbone,
            fmt,
            sources,
            adapter,
            mixing,
            cfg.rho,
            batch_size,
            progress=_advance(bar),
        )
    result.update(score(hyps, refs), outputs=hyps)
    return result
