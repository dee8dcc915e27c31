"""The tenant's Flower ClientApp: one train and one evaluate step per round.

Per-node settings come from the SuperNode's `--node-config` (NodeConfig), per-run settings from
`[tool.flwr.app.config]` (RunSettings). The adapter only leaves the tenant when the run aggregates
(`aggregation = "fedavg"`) and the tenant belongs to an aggregation group.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pema.adapter import CONFIG_FILE, AdapterConfig, load_adapter, save_adapter
from pema.backbone import MemoryMode
from pema.data import read_pairs
from pema.errors import PemaError
from pema.models import cache_dir
from pema.prompts import DEFAULT_TEMPLATE, PromptFormat
from pema.training import TrainConfig, TrainEvent, evaluate_memory
from tenant.backend import Backend, coordinator_backend, local_backend
from tenant.cli import BEST as _BEST
from tenant.coordinator_client import TlsOptions
from tenant.jobs import evaluate_job, obtain_memory, train_job
from tenant.memory_store import ShardedMemoryStore, check_tenant_id
from tenant.metrics import PeakRss, RoundFigures, record_quality, record_round
from tenant.redis_store import open_memory_store

log = logging.getLogger(__name__)

AGGREGATIONS = ("none", "fedavg")
BEST: dict[str, Any] = dict(_BEST)  # the CLI's best configuration, values typed loosely
ARRAYS = "arrays"  # RecordDict key of adapter arrays, both directions
CONFIG = "config"  # RecordDict key of the server's round config
TENANT = "tenant"  # RecordDict key of the reply's ConfigRecord (tenant id, group, samples)
METRICS = "metrics"


@dataclass(frozen=True)
class NodeConfig:
    """What one SuperNode's `--node-config` says about its tenant."""

    tenant_id: str
    train: Path
    valid: Path
    adapter_dir: Path
    test: Path | None = None
    token: str = ""
    coordinator: str = ""
    model: str = ""  # local model folder while no coordinator serves the model
    max_pairs: int | None = None
    max_valid_pairs: int = 100
    template: str = DEFAULT_TEMPLATE
    redis_url: str = ""
    cache_fallback: str = "disk"
    cache_dir: Path | None = None
    group: str = ""  # aggregation group; empty keeps the adapter private
    # Round figures for this tenant's metrics exporter (tenant.metrics); default: next to the
    # adapter folder, where the cache counters have always been kept.
    metrics_file: Path | None = None
    threads: int = 1
    # Tenants share the coordinator's CPU: smaller Encode requests interleave across tenants, and
    # a request may wait behind others' for a while on a small machine.
    coordinator_timeout: float = 600.0
    encode_request_tokens: int = 4096
    # TLS to the coordinator (CA; client cert + key for mutual TLS) and to Redis (rediss://).
    coordinator_tls_ca: Path | None = None
    coordinator_tls_cert: Path | None = None
    coordinator_tls_key: Path | None = None
    redis_tls_ca: Path | None = None

    def metrics_path(self) -> Path:
        return self.metrics_file or self.adapter_dir.parent / f".{self.tenant_id}.metrics.json"

    def coordinator_tls(self) -> TlsOptions | None:
        return TlsOptions.named(
            self.coordinator_tls_ca, self.coordinator_tls_cert, self.coordinator_tls_key
        )

    @classmethod
    def from_context(cls, context: Context) -> NodeConfig:
        c: dict[str, Any] = dict(context.node_config)

        def path(key: str) -> Path | None:
            return Path(str(c[key])) if c.get(key) else None

        for key in ("tenant-id", "train", "valid", "adapter-dir"):
            if not c.get(key):
                raise PemaError(f"node config needs {key!r}")
        return cls(
            tenant_id=check_tenant_id(str(c["tenant-id"])),
            train=Path(str(c["train"])),
            valid=Path(str(c["valid"])),
            adapter_dir=Path(str(c["adapter-dir"])),
            test=path("test"),
            token=str(c.get("token", "")),
            coordinator=str(c.get("coordinator", "")),
            model=str(c.get("model", "")),
            max_pairs=int(c["max-pairs"]) if c.get("max-pairs") else None,
            max_valid_pairs=int(c.get("max-valid-pairs", 100)),
            template=str(c.get("template", DEFAULT_TEMPLATE)),
            redis_url=str(c.get("redis-url", "")),
            cache_fallback=str(c.get("cache-fallback", "disk")),
            cache_dir=path("cache-dir"),
            group=str(c.get("aggregation-group", "")),
            metrics_file=path("metrics-file"),
            threads=int(c.get("threads", 1)),
            coordinator_timeout=float(c.get("coordinator-timeout", 600.0)),
            encode_request_tokens=int(c.get("encode-request-tokens", 4096)),
            coordinator_tls_ca=path("coordinator-tls-ca"),
            coordinator_tls_cert=path("coordinator-tls-cert"),
            coordinator_tls_key=path("coordinator-tls-key"),
            redis_tls_ca=path("redis-tls-ca"),
        )


@dataclass(frozen=True)
class RunSettings:
    """The run's `[tool.flwr.app.config]` plus the round number the server sends."""

    server_round: int
    local_epochs: int
    lr: float
    batch_size: int
    aggregation: str
    eval_sample_size: int
    redis_ttl: int | None
    shard_pairs: int

    @classmethod
    def from_message(cls, msg: Message, context: Context) -> RunSettings:
        r: dict[str, Any] = dict(context.run_config)
        sent: dict[str, Any] = dict(msg.content[CONFIG])
        aggregation = str(r.get("aggregation", "none"))
        if aggregation not in AGGREGATIONS:
            raise PemaError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        ttl = int(r.get("redis-ttl", 0))
        return cls(
            server_round=int(sent.get("server-round", 1)),
            local_epochs=int(r.get("local-epochs", 1)),
            lr=float(r.get("lr", BEST["lr"])),
            batch_size=int(r.get("batch-size", BEST["batch_size"])),
            aggregation=aggregation,
            eval_sample_size=int(r.get("eval-sample-size", 16)),
            redis_ttl=ttl or None,
            shard_pairs=int(r.get("shard-pairs", 256)),
        )


def shares_adapter(node: NodeConfig, run: RunSettings) -> bool:
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
        )
    return local_backend(node.model or None)


def _store(node: NodeConfig, run: RunSettings) -> ShardedMemoryStore:
    root = node.cache_dir or cache_dir() / "memories"
    return open_memory_store(
        node.redis_url or None, root, node.cache_fallback, run.redis_ttl, run.shard_pairs,
        node.redis_tls_ca,
    )  # fmt: skip


def adapter_config(template: str) -> AdapterConfig:
    """The adapter a tenant trains in rounds: the CLI's best configuration, with its template."""
    return AdapterConfig(
        hidden_size=1,  # set from the model by train_job
        rank=int(BEST["rank"]),
        variant=str(BEST["variant"]),
        key_norm=str(BEST["key_norm"]),
        kappa=float(BEST["kappa"]),
        lambda_max=float(BEST["lambda_max"]),
        schedule=str(BEST["schedule"]),
        template=template,
        memory_mode=str(BEST["memory_mode"]),
    )


def _received_state(msg: Message) -> dict[str, torch.Tensor] | None:
    arrays = msg.content.array_records.get(ARRAYS)
    return arrays.to_torch_state_dict() if arrays is not None and len(arrays) else None


def _reply(metrics: dict[str, Any], node: NodeConfig, **extra: Any) -> RecordDict:
    info = ConfigRecord({"tenant-id": node.tenant_id, "group": node.group, **extra})
    return RecordDict({METRICS: MetricRecord(metrics), TENANT: info})


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    node = NodeConfig.from_context(context)
    run = RunSettings.from_message(msg, context)
    torch.set_num_threads(node.threads)
    backend = make_backend(node)
    shared = shares_adapter(node, run)
    # Start from the group's average when aggregating, else from this tenant's own checkpoint.
    start_state = _received_state(msg) if shared else None
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
    cfg = TrainConfig(lr=run.lr, batch_size=run.batch_size, epochs=run.local_epochs)
    with PeakRss() as rss:
        outcome = train_job(
            backend, train_pairs, valid_pairs, adapter_config(node.template), cfg, node.adapter_dir,
            _store(node, run), node.tenant_id, quiet=True, start_state=start_state,
            phases=(2,) if start_state is not None else (1, 2), on_event=on_event,
        )  # fmt: skip
    s = outcome.summary
    valid = outcome.report.valid
    cache_hit = bool(s["memory_cache_hit"])
    metrics = {
        "num-examples": len(train_pairs),
        "train-keys": s["train_keys"],
        "train-loss": sum(losses) / len(losses) if losses else 0.0,  # mean over the round's steps
        "valid-loss": valid["loss"],
        "valid-top1": valid["top1"],
        "train-seconds": outcome.report.seconds,
        "memory-build-seconds": s["memory_build_seconds"],
        "cache-hit": int(cache_hit),
        "peak-train-memory-bytes": rss.peak,
        "train-memory-extra-bytes": rss.extra,
        "step-seconds": sum(steps) / len(steps) if steps else 0.0,
        "steps": sum(p.steps for p in outcome.report.phases.values()),
        "round-seconds": time.perf_counter() - started,
    }
    figures = RoundFigures(
        rss.peak, float(metrics["step-seconds"]), float(metrics["round-seconds"]),
        float(s["memory_build_seconds"]), cache_hit, float(valid["loss"]),
    )  # fmt: skip
    record_round(node.metrics_path(), figures)
    content = _reply(metrics, node, started_from=origin)
    if shared:
        # Only here does the adapter leave the tenant: the group's average needs it.
        content[ARRAYS] = ArrayRecord(outcome.adapter.state_dict())
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    node = NodeConfig.from_context(context)
    run = RunSettings.from_message(msg, context)
    torch.set_num_threads(node.threads)
    backend = make_backend(node)
    adapter, doc = load_adapter(node.adapter_dir, backend.backbone.info.revision)
    received = _received_state(msg) if shares_adapter(node, run) else None
    if received is not None:
        # The group's average becomes this tenant's checkpoint: the next round starts from it.
        adapter.load_state_dict(received)
        save_adapter(
            adapter, node.adapter_dir, extra={k: v for k, v in doc.items() if k != "config"}
        )
    fmt = PromptFormat(backend.tokenizer, adapter.config.template)
    valid_pairs = read_pairs(node.valid, node.max_valid_pairs)
    valid_mem = obtain_memory(
        backend, fmt, valid_pairs, MemoryMode.TEACHER_FORCED, _store(node, run), node.tenant_id,
        quiet=True,
    )  # fmt: skip
    valid = evaluate_memory(adapter, backend.backbone.head(), valid_mem.memory)
    sample = read_pairs(node.test or node.valid, run.eval_sample_size)
    # The untuned model's scores do not change between rounds: compute them once, in round 1.
    result = evaluate_job(
        backend, adapter, sample, include_untuned=run.server_round == 1, quiet=True
    )
    metrics = {
        "num-examples": len(sample),
        "valid-loss": valid["loss"],
        "valid-top1": valid["top1"],
        "bleu": result["bleu"],
        "chrf": result["chrf"],
    }
    extra = {
        "sample-source": sample[0].source,
        "sample-reference": sample[0].target,
        "sample-output": result["outputs"][0],
    }
    if "zero_shot_bleu" in result:
        metrics |= {
            "zero-shot-bleu": result["zero_shot_bleu"],
            "zero-shot-chrf": result["zero_shot_chrf"],
        }
        extra["sample-zero-shot"] = result["zero_shot_outputs"][0]
    record_quality(node.metrics_path(), result["bleu"], result["chrf"])
    return Message(_reply(metrics, node, **extra), reply_to=msg)
