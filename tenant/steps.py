"""A round's train and evaluate steps on the tenant, wherever they run.

The ClientApp hands each step to `run_job` (through tenant/worker_link.py): in its own process,
which starts with nothing loaded, or in the tenant's long-lived worker (tenant/worker.py), which
passes the `Warm` state it keeps between steps. Both paths are this code.

Per-node settings come from the SuperNode's `--node-config` (NodeConfig), per-run settings from
`[tool.flwr.app.config]` (RunConfig in tenant/federation.py); both reject unknown keys. A step
returns numbers, a few closed-set identifiers and the adapter only when the run aggregates
(`aggregation = "fedavg"`) and the tenant opted into an aggregation group; the ClientApp builds
the reply from them through the allow-list. Sample generations stay in the tenant's own file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pema.adapter import CONFIG_FILE, AdapterConfig, PemaAdapter, load_adapter, save_adapter
from pema.backbone import MemoryMode
from pema.data import read_pairs
from pema.errors import PemaError
from pema.models import cache_dir
from pema.prompts import DEFAULT_TEMPLATE, PromptFormat
from pema.training import TrainConfig, TrainEvent, evaluate_memory
from tenant.backend import Backend, coordinator_backend, local_backend
from tenant.cli import BEST as _BEST
from tenant.coordinator_client import CoordinatorBackbone, TlsOptions
from tenant.federation import GROUP_PATTERN, RunConfig, validated
from tenant.jobs import MemoryCache, evaluate_job, obtain_memory, train_job
from tenant.memory_store import ShardedMemoryStore, check_tenant_id
from tenant.metrics import PeakRss, RoundFigures, record_quality, record_round
from tenant.redis_store import open_memory_store
from tenant.worker_link import Arrays, Job, StepResult

BEST: dict[str, Any] = dict(_BEST)  # the CLI's best configuration, values typed loosely


class NodeConfig(BaseModel):
    """What one SuperNode's `--node-config` says about its tenant; an unknown key or a bad value
    fails the round with the key named (a typo must not silently change what the tenant does).
    The keys that send steps to a worker are tenant/worker_link.py's WorkerLink."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    tenant_id: str = Field(alias="tenant-id")
    train: Path
    valid: Path
    adapter_dir: Path = Field(alias="adapter-dir")
    test: Path | None = None
    token: str = ""
    coordinator: str = ""
    model: str = ""  # local model folder while no coordinator serves the model
    max_pairs: int | None = Field(None, alias="max-pairs", ge=1)
    max_valid_pairs: int = Field(100, alias="max-valid-pairs", ge=1)
    template: str = DEFAULT_TEMPLATE
    # The privacy choice of what the model owner sees (README, "Security"): teacher-forced
    # memories send the gold targets to the coordinator as token ids; free-running ones keep
    # them on the tenant (the owner sees only the inputs and the model's own outputs).
    memory_mode: Literal["teacher-forced", "free-running"] = Field(
        "teacher-forced", alias="memory-mode"
    )
    redis_url: str = Field("", alias="redis-url")
    cache_fallback: Literal["disk", "fail"] = Field("disk", alias="cache-fallback")
    cache_dir: Path | None = Field(None, alias="cache-dir")
    group: str = Field("", alias="aggregation-group")  # opt-in; empty keeps the adapter private
    # Round figures for this tenant's metrics exporter (tenant.metrics); default: next to the
    # adapter folder, where the cache counters have always been kept.
    metrics_file: Path | None = Field(None, alias="metrics-file")
    threads: int = Field(1, ge=1)
    # Tenants share the coordinator's CPU: smaller Encode requests interleave across tenants, and
    # a request may wait behind others' for a while on a small machine.
    coordinator_timeout: float = Field(600.0, alias="coordinator-timeout", gt=0)
    encode_request_tokens: int = Field(4096, alias="encode-request-tokens", ge=1)
    # How long to keep retrying an unavailable coordinator (a restart mid-round); 0: fail at once.
    coordinator_retry_seconds: float = Field(120.0, alias="coordinator-retry-seconds", ge=0)
    # Where evaluate writes its sample generations (JSON Lines, on the tenant only); default
    # `<adapter-dir>.samples.jsonl`.
    sample_log: Path | None = Field(None, alias="sample-log")
    # TLS to the coordinator (CA; client cert + key for mutual TLS) and to Redis (rediss://).
    coordinator_tls_ca: Path | None = Field(None, alias="coordinator-tls-ca")
    coordinator_tls_cert: Path | None = Field(None, alias="coordinator-tls-cert")
    coordinator_tls_key: Path | None = Field(None, alias="coordinator-tls-key")
    redis_tls_ca: Path | None = Field(None, alias="redis-tls-ca")

    def metrics_path(self) -> Path:
        return self.metrics_file or self.adapter_dir.parent / f".{self.tenant_id}.metrics.json"

    def coordinator_tls(self) -> TlsOptions | None:
        return TlsOptions.named(
            self.coordinator_tls_ca, self.coordinator_tls_cert, self.coordinator_tls_key
        )

    @field_validator("tenant_id")
    @classmethod
    def _tenant(cls, v: str) -> str:
        try:
            return check_tenant_id(v)
        except PemaError as e:
            raise ValueError(str(e)) from None

    @field_validator("group")
    @classmethod
    def _group(cls, v: str) -> str:
        if v and not GROUP_PATTERN.fullmatch(v):
            raise ValueError("a group is lower-case letters, digits and '-'")
        return v

    @classmethod
    def from_values(cls, node_config: Mapping[str, Any]) -> NodeConfig:
        """From the SuperNode's node config, where an empty value means "not set"."""
        values = {k: v for k, v in node_config.items() if v != ""}
        return validated(cls, values, "node config")

    @property
    def samples_path(self) -> Path:
        return self.sample_log or self.adapter_dir.with_name(
            self.adapter_dir.name + ".samples.jsonl"
        )


@dataclass(frozen=True)
class RunSettings:
    """The run's `[tool.flwr.app.config]` plus the round number the server sends."""

    server_round: int
    config: RunConfig

    @classmethod
    def from_job(cls, job: Job) -> RunSettings:
        return cls(job.server_round, validated(RunConfig, job.run, "run config"))


def shares_adapter(node: NodeConfig, run: RunConfig) -> bool:
    """The tenant's opt-in: its adapter leaves only when the run aggregates and its node config
    names a group (the server still decides whether it is averaged, and with whom)."""
    return run.aggregation == "fedavg" and bool(node.group)


def make_backend(node: NodeConfig) -> Backend:
    """The frozen model behind the coordinator named in the node config; without one, a local
    model folder (`model`, else the default model) loaded in this process."""
    if node.coordinator:
        return coordinator_backend(
            node.coordinator,
            node.token,
            node.coordinator_tls(),
            timeout=node.coordinator_timeout,
            max_request_tokens=node.encode_request_tokens,
            retry_seconds=node.coordinator_retry_seconds,
        )
    return local_backend(node.model or None)


class Warm:
    """What the tenant's worker keeps between steps: the backend (the coordinator's connection,
    the model's head and tokenizer, or a local model) and the memories it used last. A step in the
    ClientApp's own process starts from an empty one, so `loads` (what had to be loaded, not found
    warm) means the same on both paths."""

    def __init__(self, memory_slots: int = 4) -> None:
        self.memories = MemoryCache(memory_slots)
        # With the node config it was made for: the SuperNode's never changes while it runs, and
        # any change (another coordinator, token, model) makes the backend anew.
        self._backend: tuple[NodeConfig, Backend] | None = None
        self._backend_loads = 0

    @property
    def loads(self) -> int:
        return self._backend_loads + self.memories.misses

    def backend(self, node: NodeConfig) -> Backend:
        if self._backend is not None:
            made_for, held = self._backend
            if made_for == node and _serves_same_model(held):
                return held
            if isinstance(held.backbone, CoordinatorBackbone):
                held.backbone.client.close()
            self._backend = None
        backend = make_backend(node)
        self._backend = (node, backend)
        self._backend_loads += 1
        return backend


def _serves_same_model(backend: Backend) -> bool:
    """A coordinator that now serves another model revision (an upgrade while the worker held its
    head) makes the held head and tokenizer stale: the backend is made anew."""
    backbone = backend.backbone
    if isinstance(backbone, CoordinatorBackbone):
        return backbone.client.model_info().revision == backbone.info.revision
    return True


def _store(node: NodeConfig, run: RunSettings) -> ShardedMemoryStore:
    root = node.cache_dir or cache_dir() / "memories"
    c = run.config
    return open_memory_store(
        node.redis_url or None, root, node.cache_fallback, c.redis_ttl or None, c.shard_pairs,
        node.redis_tls_ca,
    )  # fmt: skip


def adapter_config(template: str, memory_mode: str = "teacher-forced") -> AdapterConfig:
    """The adapter a tenant trains in rounds: the CLI's best configuration, with its template
    and the memory mode its node config chose."""
    return AdapterConfig(
        hidden_size=1,  # set from the model by train_job
        rank=int(BEST["rank"]),
        variant=str(BEST["variant"]),
        key_norm=str(BEST["key_norm"]),
        kappa=float(BEST["kappa"]),
        lambda_max=float(BEST["lambda_max"]),
        schedule=str(BEST["schedule"]),
        template=template,
        memory_mode=memory_mode,
    )


def upload_arrays(state: dict[str, torch.Tensor], clipping_range: float) -> list[np.ndarray]:
    """The adapter as SecAgg+ sums it: its tensors in state_dict order, unnamed (the group's
    average comes back in that order: `received_state`). SecAgg+ clips values to the clipping
    range before quantizing them; an adapter beyond it fails here instead of being averaged
    clipped."""
    arrays = list(_arrays(state).values())
    largest = max((float(np.abs(a).max()) for a in arrays if a.size), default=0.0)
    if largest > clipping_range:
        raise PemaError(
            f"adapter values reach {largest:.3g}, beyond SecAgg+'s clipping range "
            f"+-{clipping_range:g}: they would be averaged clipped"
        )
    return arrays


def adapter_names() -> list[str]:
    """The round adapter's parameter names in state_dict order: the order `upload_arrays` sends
    them in, and so the order of a SecAgg+ group average. (They depend on the adapter settings of
    `adapter_config`, not on a tenant's template or memory mode.)"""
    return list(PemaAdapter(adapter_config(DEFAULT_TEMPLATE)).state_dict())


def received_state(arrays: Arrays | None, run: RunConfig) -> dict[str, torch.Tensor] | None:
    """The group's average the server sent, if any, as a state dict: named in the clear, and
    unnamed (float64, in `adapter_names` order) from SecAgg+."""
    if arrays is None:
        return None
    if not run.secure:
        return {k: torch.from_numpy(v) for k, v in arrays.items()}
    return named_state(list(arrays.values()), adapter_names())


def named_state(arrays: list[np.ndarray], names: list[str]) -> dict[str, torch.Tensor]:
    """A group average SecAgg+ returned (unnamed, float64) as this adapter's state dict."""
    if len(arrays) != len(names):
        raise PemaError(f"the group's average has {len(arrays)} arrays, this adapter {len(names)}")
    return {
        n: torch.from_numpy(np.asarray(a, dtype=np.float32))
        for n, a in zip(names, arrays, strict=True)
    }


def _arrays(state: dict[str, torch.Tensor]) -> Arrays:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def _begin(node: NodeConfig, warm: Warm) -> tuple[float, int, Backend]:
    """A step's start: its clock, the state loads so far (a reply counts its own), the backend."""
    started, loads = time.perf_counter(), warm.loads
    torch.set_num_threads(node.threads)
    return started, loads, warm.backend(node)


def train_step(
    node: NodeConfig, run: RunSettings, received: Arrays | None, warm: Warm
) -> StepResult:
    started, loads, backend = _begin(node, warm)
    shared = shares_adapter(node, run.config)
    # Start from the group's average when aggregating, else from this tenant's own checkpoint.
    start_state = received_state(received, run.config) if shared else None
    origin = "group" if start_state is not None else "init"
    if start_state is None and (node.adapter_dir / CONFIG_FILE).is_file():
        adapter, _ = load_adapter(node.adapter_dir, backend.backbone.info.revision)
        start_state, origin = adapter.state_dict(), "checkpoint"
    steps: list[float] = []
    losses: list[float] = []
    last: list[float] = []  # end of the previous step; none before the first or after a validation

    def on_event(e: TrainEvent) -> None:
        # Step latency only: the time before the first step (memory) and validations is not in it.
        now = time.perf_counter()
        if e.kind == "step":
            losses.append(e.loss)
        if e.kind == "step" and last:
            steps.append(now - last[0])
        last[:] = [now] if e.kind == "step" else []

    train_pairs = read_pairs(node.train, node.max_pairs)
    valid_pairs = read_pairs(node.valid, node.max_valid_pairs)
    c = run.config
    cfg = TrainConfig(lr=c.lr, batch_size=c.batch_size, epochs=c.local_epochs)
    with PeakRss() as rss:
        outcome = train_job(
            backend, train_pairs, valid_pairs, adapter_config(node.template, node.memory_mode),
            cfg, node.adapter_dir, _store(node, run), node.tenant_id, quiet=True,
            start_state=start_state, phases=(2,) if start_state is not None else (1, 2),
            on_event=on_event, kept=warm.memories,
        )  # fmt: skip
    s = outcome.summary
    valid = outcome.report.valid
    cache_hit = bool(s["memory_cache_hit"])
    metrics: dict[str, int | float] = {
        "num-examples": len(train_pairs),
        "train-keys": int(s["train_keys"]),
        "train-loss": sum(losses) / len(losses) if losses else 0.0,  # mean over the round's steps
        "valid-loss": float(valid["loss"]),
        "valid-top1": float(valid["top1"]),
        "train-seconds": outcome.report.seconds,
        "memory-build-seconds": float(s["memory_build_seconds"]),
        "cache-hit": int(cache_hit),
        "peak-train-memory-bytes": rss.peak,
        "train-memory-extra-bytes": rss.extra,
        "step-seconds": sum(steps) / len(steps) if steps else 0.0,
        "steps": sum(p.steps for p in outcome.report.phases.values()),
        "state-loads": warm.loads - loads,
        "round-seconds": time.perf_counter() - started,
    }
    figures = RoundFigures(
        rss.peak, float(metrics["step-seconds"]), float(metrics["round-seconds"]),
        float(s["memory_build_seconds"]), cache_hit, float(valid["loss"]),
    )  # fmt: skip
    record_round(node.metrics_path(), figures)
    info = {"group": node.group, "started-from": origin, "memory-mode": node.memory_mode}
    # Only here does the adapter leave the tenant in the clear, when its group is averaged so;
    # under secure aggregation it leaves only masked, through the ClientApp's SecAgg+ upload.
    plain = shared and not run.config.secure
    arrays = _arrays(outcome.adapter.state_dict()) if plain else None
    return StepResult(metrics, info, arrays)


def evaluate_step(
    node: NodeConfig, run: RunSettings, received: Arrays | None, warm: Warm
) -> StepResult:
    started, loads, backend = _begin(node, warm)
    adapter, doc = load_adapter(node.adapter_dir, backend.backbone.info.revision)
    average = received_state(received, run.config) if shares_adapter(node, run.config) else None
    if average is not None:
        # The group's average becomes this tenant's checkpoint: the next round starts from it.
        adapter.load_state_dict(average)
        save_adapter(
            adapter, node.adapter_dir, extra={k: v for k, v in doc.items() if k != "config"}
        )
    fmt = PromptFormat(backend.tokenizer, adapter.config.template)
    valid_pairs = read_pairs(node.valid, node.max_valid_pairs)
    valid_mem = obtain_memory(
        backend, fmt, valid_pairs, MemoryMode.TEACHER_FORCED, _store(node, run), node.tenant_id,
        quiet=True, kept=warm.memories,
    )  # fmt: skip
    valid = evaluate_memory(adapter, backend.backbone.head(), valid_mem.memory)
    sample = read_pairs(node.test or node.valid, run.config.eval_sample_size)
    # The untuned model's scores do not change between rounds: compute them once, in round 1.
    result = evaluate_job(
        backend, adapter, sample, include_untuned=run.server_round == 1, quiet=True
    )
    metrics: dict[str, int | float] = {
        "num-examples": len(sample),
        "valid-loss": float(valid["loss"]),
        "valid-top1": float(valid["top1"]),
        "bleu": float(result["bleu"]),
        "chrf": float(result["chrf"]),
    }
    # The sample generations stay here, in the tenant's own file: the server gets scores only.
    record: dict[str, Any] = {
        "round": run.server_round,
        "source": sample[0].source,
        "reference": sample[0].target,
        "output": result["outputs"][0],
    }
    if "untuned_bleu" in result:
        metrics |= {
            "untuned-bleu": float(result["untuned_bleu"]),
            "untuned-chrf": float(result["untuned_chrf"]),
        }
        record["untuned"] = result["untuned_outputs"][0]
    node.samples_path.parent.mkdir(parents=True, exist_ok=True)
    with node.samples_path.open("a") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    record_quality(node.metrics_path(), result["bleu"], result["chrf"])
    metrics["state-loads"] = warm.loads - loads
    metrics["seconds"] = time.perf_counter() - started
    return StepResult(metrics, {"group": node.group})


def run_job(job: Job, warm: Warm | None = None) -> StepResult:
    """Run one step; `warm` is the worker's kept state (None: load everything, as a ClientApp
    that runs the step in its own process does)."""
    node = NodeConfig.from_values(job.node)
    run = RunSettings.from_job(job)
    step = train_step if job.phase == "train" else evaluate_step
    return step(node, run, job.arrays, warm or Warm())
