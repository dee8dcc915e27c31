"""The tenant's Flower ClientApp: one train and one evaluate step per round.

Per-node settings come from the SuperNode's `--node-config` (NodeConfig), per-run settings from
`[tool.flwr.app.config]` (RunConfig in tenant/federation.py); both reject unknown keys. Every
reply is built from the allow-list in tenant/federation.py: numbers, a few closed-set identifiers,
and the adapter only when the run aggregates (`aggregation = "fedavg"`) and the tenant opted into
an aggregation group. Under secure aggregation (the default with fedavg) the adapter leaves only
through Flower's SecAgg+ protocol (`secure_aggregation`, around secaggplus_mod): after the round's
training, the server asks a group's members for their adapters, and each sends it masked so that
only the group's sum can be unmasked. Sample generations stay in the tenant's own file; a failed
step replies with its phase and exception class only.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, NDArrays, Status, ndarrays_to_parameters
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.compat.common import recorddict_compat as compat
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
from tenant.coordinator_client import TlsOptions
from tenant.federation import (
    ARRAYS,
    CONFIG,
    GROUP_PATTERN,
    INFO,
    METRICS,
    SECAGG,
    RunConfig,
    error_reason,
    plain_flower_logs,
    reply_violations,
    validated,
)
from tenant.jobs import evaluate_job, obtain_memory, train_job
from tenant.memory_store import ShardedMemoryStore, check_tenant_id
from tenant.metrics import PeakRss, RoundFigures, record_quality, record_round
from tenant.redis_store import open_memory_store

log = logging.getLogger(__name__)
Handler = Callable[[Message, Context], Message]

BEST: dict[str, Any] = dict(_BEST)  # the CLI's best configuration, values typed loosely


class NodeConfig(BaseModel):
    """What one SuperNode's `--node-config` says about its tenant; an unknown key or a bad value
    fails the round with the key named (a typo must not silently change what the tenant does)."""

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
    def from_context(cls, context: Context) -> NodeConfig:
        values = {k: v for k, v in context.node_config.items() if v != ""}
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
    def from_message(cls, msg: Message, context: Context) -> RunSettings:
        config = validated(RunConfig, dict(context.run_config), "run config")
        sent: dict[str, Any] = dict(msg.content[CONFIG])
        return cls(int(sent.get("server-round", 1)), config)


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


def upload_arrays(state: dict[str, torch.Tensor], clipping_range: float) -> NDArrays:
    """The adapter as SecAgg+ sums it: its tensors in state_dict order, unnamed (the group's
    average comes back in that order: `named_state`). SecAgg+ clips values to the clipping range
    before quantizing them; an adapter beyond it fails here instead of being averaged clipped."""
    arrays = [t.detach().cpu().numpy() for t in state.values()]
    largest = max((float(np.abs(a).max()) for a in arrays if a.size), default=0.0)
    if largest > clipping_range:
        raise PemaError(
            f"adapter values reach {largest:.3g}, beyond SecAgg+'s clipping range "
            f"+-{clipping_range:g}: they would be averaged clipped"
        )
    return arrays


def named_state(arrays: NDArrays, names: list[str]) -> dict[str, torch.Tensor]:
    """A group average SecAgg+ returned (unnamed, float64) as this adapter's state dict."""
    if len(arrays) != len(names):
        raise PemaError(f"the group's average has {len(arrays)} arrays, this adapter {len(names)}")
    return {
        n: torch.from_numpy(np.asarray(a, dtype=np.float32))
        for n, a in zip(names, arrays, strict=True)
    }


def _received_state(msg: Message, run: RunConfig) -> dict[str, torch.Tensor] | None:
    """The group's average the server sent, if any, as a state dict."""
    arrays = msg.content.array_records.get(ARRAYS)
    if arrays is None or not len(arrays):
        return None
    if not run.secure:
        return arrays.to_torch_state_dict()
    return named_state(arrays.to_numpy_ndarrays(), adapter_names())


def adapter_names() -> list[str]:
    """The round adapter's parameter names in state_dict order: the order `upload_arrays` sends
    them in, and so the order of a SecAgg+ group average. (They depend on the adapter settings of
    `adapter_config`, not on a tenant's template or memory mode.)"""
    return list(PemaAdapter(adapter_config(DEFAULT_TEMPLATE)).state_dict())


def _reply(
    msg: Message,
    phase: str,
    metrics: dict[str, int | float],
    info: dict[str, str],
    arrays: ArrayRecord | None = None,
) -> Message:
    """The reply, built only from allow-listed fields (tenant/federation.py); anything else is a
    bug here and fails the round on the tenant rather than reach the server."""
    content = RecordDict({METRICS: MetricRecord(dict(metrics)), INFO: ConfigRecord(dict(info))})
    if arrays is not None:
        content[ARRAYS] = arrays
    bad = reply_violations(content, phase, arrays_allowed=arrays is not None)
    if bad:
        raise PemaError(f"reply fields not on the allow-list: {', '.join(bad)}")
    return Message(content, reply_to=msg)


class StepFailed(Exception):
    """The step inside the SecAgg+ mod replied with an error; its reason is already private."""


def _error_reply(msg: Message, phase: str, error: Exception) -> Message:
    """A short code and the exception's class only; the whole error (paths, data) goes to the
    tenant's own log."""
    log.exception("%s failed", phase)
    reason = str(error) if isinstance(error, StepFailed) else error_reason(phase, error)
    return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)


def _private_errors(phase: str) -> Callable[[Handler], Handler]:
    """A failed step replies through `_error_reply`."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def run(msg: Message, context: Context) -> Message:
            try:
                return handler(msg, context)
            except Exception as e:
                return _error_reply(msg, phase, e)

        return run

    return wrap


def secure_aggregation(msg: Message, context: Context, call_next: Handler) -> Message:
    """Flower's secaggplus_mod for the SecAgg+ protocol's messages (any other train message goes
    straight on), with each reply checked against the allow-list for its stage before it leaves."""
    configs = msg.content.config_records.get(SECAGG)
    if configs is None:
        return call_next(msg, context)
    stage = str(configs.get(SecAggKey.STAGE, ""))  # read before the mod pops it

    def step(m: Message, c: Context) -> Message:
        reply = call_next(m, c)
        if reply.has_error():
            raise StepFailed(reply.error.reason)
        return reply

    try:
        reply = secaggplus_mod(msg, context, step)
        bad = reply_violations(reply.content, stage, arrays_allowed=False)
        if bad:
            raise PemaError(f"SecAgg+ {stage} reply fields not on the allow-list: {bad}")
        return reply
    except Exception as e:
        return _error_reply(msg, "secagg", e)


app = ClientApp()
plain_flower_logs()


@app.train(mods=[secure_aggregation])
def train(msg: Message, context: Context) -> Message:
    # SecAgg+'s masked-vector stage asks for the adapter this round trained (the mod masks it);
    # every other train message that reaches here is the round's training.
    if SECAGG in msg.content.config_records:
        return upload(msg, context)
    return train_round(msg, context)


@_private_errors("upload")
def upload(msg: Message, context: Context) -> Message:
    """The adapter this round trained (its checkpoint), in the legacy FitRes shape secaggplus_mod
    reads, weighted by the training pairs as the train reply's num-examples: the mod masks it and
    empties the arrays before the reply leaves."""
    node = NodeConfig.from_context(context)
    run = validated(RunConfig, dict(context.run_config), "run config")
    if not (run.secure and shares_adapter(node, run)):
        raise PemaError("this tenant shares its adapter only into its group's SecAgg+ sum")
    sent = msg.content.config_records["fitins.config"]
    adapter, doc = load_adapter(node.adapter_dir)
    arrays = upload_arrays(adapter.state_dict(), float(sent["clipping-range"]))  # type: ignore[arg-type]
    weight = int(doc["training"]["train_pairs"])
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), weight, {})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


@_private_errors("train")
def train_round(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    node = NodeConfig.from_context(context)
    run = RunSettings.from_message(msg, context)
    torch.set_num_threads(node.threads)
    backend = make_backend(node)
    shared = shares_adapter(node, run.config)
    # Start from the group's average when aggregating, else from this tenant's own checkpoint.
    start_state = _received_state(msg, run.config) if shared else None
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
            on_event=on_event,
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
        "round-seconds": time.perf_counter() - started,
    }
    figures = RoundFigures(
        rss.peak, float(metrics["step-seconds"]), float(metrics["round-seconds"]),
        float(s["memory_build_seconds"]), cache_hit, float(valid["loss"]),
    )  # fmt: skip
    record_round(node.metrics_path(), figures)
    info = {"group": node.group, "started-from": origin, "memory-mode": node.memory_mode}
    # Only here does the adapter leave the tenant in the clear, when the group is averaged so;
    # under secure aggregation it leaves only masked, through `upload`.
    plain = shared and not run.config.secure
    arrays = ArrayRecord(outcome.adapter.state_dict()) if plain else None
    return _reply(msg, "train", metrics, info, arrays)


@app.evaluate()
@_private_errors("evaluate")
def evaluate(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    node = NodeConfig.from_context(context)
    run = RunSettings.from_message(msg, context)
    torch.set_num_threads(node.threads)
    backend = make_backend(node)
    adapter, doc = load_adapter(node.adapter_dir, backend.backbone.info.revision)
    shared = shares_adapter(node, run.config)
    received = _received_state(msg, run.config) if shared else None
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
    metrics["seconds"] = time.perf_counter() - started
    return _reply(msg, "evaluate", metrics, {"group": node.group})
