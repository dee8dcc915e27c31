"""What crosses the federation, in one place: the run config both apps read, and the allow-list of
what a tenant's Flower reply may carry.

The allow-list is the promise of the threat model (DESIGN.md): the model owner's ServerApp sees
per-tenant numbers (losses, scores, counts, timings, peak memory) and a few identifiers from closed
sets, never text or file paths; adapter arrays only when the run aggregates and the tenant opted
into a group. The ClientApp builds every reply through `reply_violations` (tenant/flower_client.py)
and the ServerApp checks every reply it receives against it again (coordinator/flower_server.py).

Imports stay light (no torch): the ServerApp imports this module too.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Literal, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.logger import update_console_handler
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pema.errors import PemaError

ARRAYS = "arrays"  # RecordDict key of adapter arrays, both directions
CONFIG = "config"  # RecordDict key of the server's round config
INFO = "tenant"  # RecordDict key of the reply's ConfigRecord (closed-set identifiers only)
METRICS = "metrics"  # RecordDict key of the reply's numbers
AGGREGATIONS = ("none", "fedavg")
MEMORY_MODES = ("teacher-forced", "free-running")
GROUP_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def plain_flower_logs() -> None:
    """Flower colours its console lines unconditionally; in pod logs and files the escape codes are
    noise, so colour stays on only for a terminal."""
    update_console_handler(colored=sys.stderr.isatty())


# Numbers a train reply may carry: counts, losses, timings, peak memory.
TRAIN_METRICS = frozenset(
    {
        "num-examples",
        "train-keys",
        "train-loss",
        "valid-loss",
        "valid-top1",
        "train-seconds",
        "memory-build-seconds",
        "cache-hit",
        "peak-train-memory-bytes",
        "train-memory-extra-bytes",
        "step-seconds",
        "steps",
        "state-loads",  # head/tokenizer and memories this step loaded (0: all warm in the worker)
        "round-seconds",
    }
)
# Numbers an evaluate reply may carry: counts, losses and scores.
EVALUATE_METRICS = frozenset(
    {
        "num-examples",
        "valid-loss",
        "valid-top1",
        "bleu",
        "chrf",
        "untuned-bleu",
        "untuned-chrf",
        "state-loads",
        "seconds",
    }
)
# Strings a reply may carry: identifiers from closed sets, each with what it may hold.
STARTS = ("init", "checkpoint", "group")
INFO_FIELDS: dict[str, re.Pattern[str] | tuple[str, ...]] = {
    # the group the tenant opted into, or none (the server decides membership)
    "group": re.compile(f"(?:{GROUP_PATTERN.pattern})?"),
    "started-from": STARTS,
    "memory-mode": MEMORY_MODES,
}
# Flower's SecAgg+ protocol (secaggplus_mod): the client's share of the protocol state, all keys,
# ciphertexts and masked integer vectors, no tenant text.
SECAGG_RECORD = "secaggplus"
_M = TypeVar("_M", bound=BaseModel)


def _allowed_string(key: str, value: object) -> bool:
    rule = INFO_FIELDS.get(key)
    if rule is None or not isinstance(value, str):
        return False
    return value in rule if isinstance(rule, tuple) else rule.fullmatch(value) is not None


def _disallowed(content: RecordDict, phase: str, arrays_allowed: bool) -> list[tuple[str, str]]:
    """(record, key) of every field the allow-list does not name; key '' for a whole record."""
    metrics = TRAIN_METRICS if phase == "train" else EVALUATE_METRICS
    bad: list[tuple[str, str]] = []
    for name, record in content.items():
        if isinstance(record, MetricRecord) and name == METRICS:
            bad += [(name, k) for k, v in record.items() if k not in metrics or isinstance(v, list)]
        elif isinstance(record, ConfigRecord) and name == INFO:
            bad += [(name, k) for k, v in record.items() if not _allowed_string(k, v)]
        elif isinstance(record, ConfigRecord) and name == SECAGG_RECORD:
            # Protocol fields are numbers, bytes (keys, ciphertexts) and lists of them.
            bad += [(name, k) for k, v in record.items() if _has_text(v)]
        elif not (isinstance(record, ArrayRecord) and name == ARRAYS and arrays_allowed):
            bad.append((name, ""))
    return bad


def _names(bad: list[tuple[str, str]]) -> list[str]:
    return [f"{r}.{k}" if k else r for r, k in bad]


def reply_violations(content: RecordDict, phase: str, arrays_allowed: bool) -> list[str]:
    """Every field of a reply that the allow-list does not name, as `record.key` (names only:
    the values may be exactly what must not be repeated). Empty when the reply is allowed."""
    return _names(_disallowed(content, phase, arrays_allowed))


def drop_disallowed(content: RecordDict, phase: str, arrays_allowed: bool) -> list[str]:
    """Remove every field the allow-list does not name from a received reply; their names."""
    bad = _disallowed(content, phase, arrays_allowed)
    for record, key in bad:
        if key:
            del content[record][key]
        else:
            del content[record]
    return _names(bad)


def _has_text(value: object) -> bool:
    if isinstance(value, list):
        return any(_has_text(v) for v in value)
    return isinstance(value, str)


def error_reason(phase: str, error: BaseException) -> str:
    """What a failed reply says: the phase and the exception's class, never its message (which
    may name the tenant's files or quote its data)."""
    return f"{phase}-failed:{type(error).__name__}"


def validated(model: type[_M], values: dict[str, Any], what: str) -> _M:
    """`model` from Flower's config values, or a PemaError naming the first bad key."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "?"
        if first["type"] == "extra_forbidden":
            raise PemaError(f"{what}: unknown key {key!r}") from None
        raise PemaError(f"{what}: {key!r}: {first['msg']}") from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class RunConfig(_Strict):
    """`[tool.flwr.app.config]` of pyproject.toml, as `flwr run --run-config` may override it.
    Both apps read it: a key neither knows is a typo and fails the run."""

    num_server_rounds: int = Field(2, alias="num-server-rounds", ge=1)
    local_epochs: int = Field(1, alias="local-epochs", ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(256, alias="batch-size", ge=1)
    aggregation: Literal["none", "fedavg"] = "none"
    eval_sample_size: int = Field(16, alias="eval-sample-size", ge=1)
    min_nodes: int = Field(2, alias="min-nodes", ge=1)
    round_timeout: float = Field(1800.0, alias="round-timeout", gt=0)
    redis_ttl: int = Field(0, alias="redis-ttl", ge=0)
    shard_pairs: int = Field(256, alias="shard-pairs", ge=1)
    round_table: str = Field("", alias="round-table")
    tenants_file: str = Field("", alias="tenants-file")
    audit_log: str = Field("", alias="audit-log")


class TenantEntry(_Strict):
    """One tenant in the operator's tenants file: the group it is averaged in (empty: private)."""

    group: str = ""

    @field_validator("group")
    @classmethod
    def _group(cls, v: str) -> str:
        if v and not GROUP_PATTERN.fullmatch(v):
            raise ValueError("a group is lower-case letters, digits and '-'")
        return v


class TenantsFile(_Strict):
    """The operator's map from registered SuperNode name (the tenant id given to
    `flwr supernode register --name`) to its group."""

    tenants: dict[str, TenantEntry]
