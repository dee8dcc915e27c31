"""What crosses the federation, in one place: the run config both apps read, and the allow-list of
what a tenant's Flower reply may carry.

The allow-list is the promise of the threat model (DESIGN.md): the model owner's ServerApp sees
per-tenant numbers (losses, scores, counts, timings, peak memory) and a few identifiers from closed
sets, never text or file paths; adapters only when the run aggregates and the tenant opted into a
group, and then, under secure aggregation (the default), only as SecAgg+ protocol values: public
keys, encrypted key shares, integer vectors masked so that only the group's sum can be unmasked,
shares of mask seeds. The ClientApp builds every reply through `reply_violations`
(tenant/flower_client.py) and the ServerApp checks every reply it receives against it again
(coordinator/flower_server.py).

Imports stay light (no torch): the ServerApp imports this module too.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Literal, TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.logger import update_console_handler
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
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
# Flower's SecAgg+ (secaggplus_mod writes these replies): the record and, per protocol stage, each
# key a reply carries with its value type (`value_type`). Nothing in them is tenant text, and the
# adapter appears only inside the masked integer vector.
SECAGG = RECORD_KEY_CONFIGS
SECAGG_REPLIES: dict[str, dict[str, str]] = {
    Stage.SETUP: {Key.PUBLIC_KEY_1: "bytes", Key.PUBLIC_KEY_2: "bytes"},
    Stage.SHARE_KEYS: {Key.DESTINATION_LIST: "list[int]", Key.CIPHERTEXT_LIST: "list[bytes]"},
    Stage.COLLECT_MASKED_VECTORS: {Key.MASKED_PARAMETERS: "list[bytes]"},
    Stage.UNMASK: {Key.NODE_ID_LIST: "list[int]", Key.SHARE_LIST: "list[bytes]"},
}
# The masked-vector stage also carries Flower's legacy FitRes records, from which the mod reads the
# adapter and its weight: the mod empties the arrays before the reply leaves, and what remains is
# the weight (the train reply's num-examples) and an empty OK status.
FITRES_RECORDS: dict[str, tuple[type, dict[str, str]]] = {
    "fitres.parameters": (ArrayRecord, {}),
    "fitres.metrics": (ConfigRecord, {}),
    "fitres.num_examples": (MetricRecord, {"num_examples": "int"}),
    "fitres.status": (ConfigRecord, {"code": "int", "message": "str"}),
}
_M = TypeVar("_M", bound=BaseModel)


def _allowed_string(key: str, value: object) -> bool:
    rule = INFO_FIELDS.get(key)
    if rule is None or not isinstance(value, str):
        return False
    return value in rule if isinstance(rule, tuple) else rule.fullmatch(value) is not None


def value_type(value: object) -> str:
    """A record value's type as the allow-list names it: `int`, `bytes`, `list[bytes]`, ..."""
    if isinstance(value, list):
        inner = sorted({type(v).__name__ for v in value})
        return f"list[{'|'.join(inner)}]" if inner else "list"
    return type(value).__name__


def _integer_vectors(blobs: list[bytes]) -> bool:
    """Whether every blob is a NumPy integer array: a masked vector, never a float adapter."""
    try:
        return all(np.issubdtype(bytes_to_ndarray(b).dtype, np.integer) for b in blobs)
    except (ValueError, OSError, EOFError):  # not a .npy array (np.load refuses pickles)
        return False


def _matches(spec: str | None, value: object) -> bool:
    kind = value_type(value)
    # An empty list carries nothing, whatever its elements would have been.
    return spec is not None and (kind == spec or (kind == "list" and spec.startswith("list[")))


def _secagg_disallowed(content: RecordDict, stage: str) -> list[tuple[str, str]]:
    """The SecAgg+ reply of `stage`: exactly the stage's keys with their types (a missing key is
    named too: the protocol reads the reply whole), plus the emptied FitRes of the masked stage."""
    records: dict[str, tuple[type, dict[str, str]]] = {
        SECAGG: (ConfigRecord, SECAGG_REPLIES[stage])
    }
    if stage == Stage.COLLECT_MASKED_VECTORS:
        records |= FITRES_RECORDS
    bad = [(name, "") for name in records if name not in content]
    for name, record in content.items():
        kind, fields = records.get(name, (type(None), {}))
        if not isinstance(record, kind):
            bad.append((name, ""))
            continue
        values = dict(record.items())
        bad += [(name, k) for k, v in values.items() if not _matches(fields.get(k), v)]
        bad += [(name, k) for k in fields if k not in values]
    masked = content.config_records.get(SECAGG, ConfigRecord()).get(Key.MASKED_PARAMETERS)
    if value_type(masked) == "list[bytes]" and not _integer_vectors(masked):  # type: ignore[arg-type]
        bad.append((SECAGG, Key.MASKED_PARAMETERS))
    if content.config_records.get("fitres.status", ConfigRecord()).get("message", "") != "":
        bad.append(("fitres.status", "message"))  # no free text, not even in a status
    return sorted(set(bad))


def _disallowed(content: RecordDict, phase: str, arrays_allowed: bool) -> list[tuple[str, str]]:
    """(record, key) of every field the allow-list does not name; key '' for a whole record."""
    if phase in SECAGG_REPLIES:
        return _secagg_disallowed(content, phase)
    metrics = TRAIN_METRICS if phase == "train" else EVALUATE_METRICS
    bad: list[tuple[str, str]] = []
    for name, record in content.items():
        if isinstance(record, MetricRecord) and name == METRICS:
            bad += [(name, k) for k, v in record.items() if k not in metrics or isinstance(v, list)]
        elif isinstance(record, ConfigRecord) and name == INFO:
            bad += [(name, k) for k, v in record.items() if not _allowed_string(k, v)]
        elif not (isinstance(record, ArrayRecord) and name == ARRAYS and arrays_allowed):
            bad.append((name, ""))
    return bad


def _names(bad: list[tuple[str, str]]) -> list[str]:
    return [f"{r}.{k}" if k else r for r, k in bad]


def reply_violations(content: RecordDict, phase: str, arrays_allowed: bool) -> list[str]:
    """Every field of a reply that the allow-list does not name, as `record.key` (names only:
    the values may be exactly what must not be repeated). Empty when the reply is allowed.
    `phase`: "train", "evaluate" or the SecAgg+ stage the reply answers (`SECAGG_REPLIES`)."""
    return _names(_disallowed(content, phase, arrays_allowed))


def drop_disallowed(content: RecordDict, phase: str, arrays_allowed: bool) -> list[str]:
    """Remove every field the allow-list does not name from a received train or evaluate reply;
    their names. (A SecAgg+ reply is read whole by the protocol: it is rejected, not trimmed.)"""
    bad = _disallowed(content, phase, arrays_allowed)
    for record, key in bad:
        if key:
            del content[record][key]
        else:
            del content[record]
    return _names(bad)


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
    # With fedavg: members' adapters are summed under Flower's SecAgg+, so that the server learns
    # only each group's average. Off, the server receives every member's adapter in the clear.
    secure_aggregation: bool = Field(True, alias="secure-aggregation")
    eval_sample_size: int = Field(16, alias="eval-sample-size", ge=1)
    min_nodes: int = Field(2, alias="min-nodes", ge=1)
    round_timeout: float = Field(1800.0, alias="round-timeout", gt=0)
    redis_ttl: int = Field(0, alias="redis-ttl", ge=0)
    shard_pairs: int = Field(256, alias="shard-pairs", ge=1)
    round_table: str = Field("", alias="round-table")
    tenants_file: str = Field("", alias="tenants-file")
    audit_log: str = Field("", alias="audit-log")

    @property
    def secure(self) -> bool:
        """Whether group averages are taken under SecAgg+ (both apps decide by this alone)."""
        return self.aggregation == "fedavg" and self.secure_aggregation


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
