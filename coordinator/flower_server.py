"""The Flower ServerApp: schedules tenant rounds, averages adapters only within aggregation groups,
and logs a per-round table of every tenant's metrics (also written to `round-table`, with a JSON
Lines copy next to it).

Who a node is comes from the operator, never from the node: the SuperLink authenticates each
SuperNode by its registered key, the operator registers it under the tenant's id
(`flwr supernode register KEY.pub --name TENANT`), and the operator's tenants file (run config
`tenants-file`) names each tenant's group. A node that is not in that file gets no work; a reply
that claims a group other than the one assigned is logged and its adapter is not averaged. Every
reply is checked against the allow-list in tenant/federation.py before anything reads it: fields
not on the list are dropped and logged by name (an optional `audit-log` records the shape of every
reply, without its values).

Secure aggregation (run config `secure-aggregation`, on by default with fedavg): every tenant
trains in the round's train messages as before, but a member's reply carries no adapter. Once the
replies are in, each group's members run Flower's SecAgg+ protocol (SecAggPlusWorkflow, one
LegacyContext per group whose ClientManager holds only that group's members): the server relays
public keys and encrypted key shares, sums masked integer vectors and learns only the weighted
average, which `GroupSum.aggregate_fit` receives. A group with fewer than two members that trained
this round is not averaged (a lone member's "sum" would be its own adapter): its members keep
their own adapters, which never leave them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tabulate
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    parameters_to_ndarrays,
)
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.server import LegacyContext, ServerConfig, SimpleClientManager
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import (
    aggregate_arrayrecords,
    aggregate_metricrecords,
    sample_nodes,
)

from pema.errors import PemaError
from tenant.federation import (
    AGGREGATIONS,
    ARRAYS,
    CONFIG,
    INFO,
    INFO_FIELDS,
    METRICS,
    SECAGG,
    SECAGG_REPLIES,
    RunConfig,
    TenantsFile,
    drop_disallowed,
    plain_flower_logs,
    reply_violations,
    validated,
    value_type,
)

log = logging.getLogger(__name__)

# The printed table fits 100 columns; the .jsonl copy keeps every field.
COLUMNS = [
    ("rnd", "round"),
    ("tenant", "tenant"),
    ("group", "group"),
    ("mode", "memory-mode"),
    ("from", "started-from"),
    ("keys", "train-keys"),
    ("mem s", "memory-build-seconds"),
    ("train s", "train-seconds"),
    ("MB", "peak-train-memory-MB"),
    ("loss", "valid-loss"),
    ("BLEU", "bleu"),
    ("chrF", "chrf"),
    ("arrays", "arrays-sent"),
]
SHORT = {"teacher-forced": "tf", "free-running": "free", "checkpoint": "ckpt"}
# The numbers Flower's per-round summary line shows, per group (or per private tenant).
SUMMARY = {"train": ("train-loss", "valid-loss"), "evaluate": ("valid-loss", "bleu", "chrf")}
# SecAgg+: every member holds a share of every other member's secrets (groups are small), and 2/3
# of them (at least 2) rebuild one: no minority of a group can help the server unmask a member,
# and a minority may drop out after the masked vectors are collected.
SECAGG_SHARES = 1.0
SECAGG_THRESHOLD = 2 / 3
# Adapter values are clipped to +-this before quantization (2^22 levels: steps of 4e-6); a tenant
# refuses to upload an adapter outside it rather than have it clipped silently.
CLIPPING_RANGE = 8.0
MIN_SECURE_MEMBERS = 2  # SecAgg+ sums at least two vectors: a lone member's would be its own


def load_tenants(path: str) -> dict[str, str]:
    """The operator's tenants: registered tenant id -> group ('' keeps it private). `path` is a
    JSON file {"tenants": {id: {"group": g}}} or a folder of `<id>.json` files {"group": g}
    (a mounted ConfigMap that each tenant's kustomize component adds a key to)."""
    if not path:
        raise PemaError("run config needs 'tenants-file' (the operator's tenant -> group map)")
    where = Path(path)
    try:
        if where.is_dir():
            files = sorted(where.glob("*.json"))
            doc = {"tenants": {f.stem: json.loads(f.read_text()) for f in files}}
        else:
            doc = json.loads(where.read_text())
    except (OSError, ValueError) as e:
        raise PemaError(f"tenants file {path}: {e}") from None
    return {t: e.group for t, e in validated(TenantsFile, doc, "tenants file").tenants.items()}


# Flower's grid looks for replies every 3 s, and a round waits on it once per message (SecAgg+:
# four times); asking the SuperLink more often costs one small RPC a poll.
REPLY_POLL_SECONDS = 0.2


class DelegatingGrid(Grid):
    """A grid that hands every call to the one it wraps, but waits for replies itself, polling
    every REPLY_POLL_SECONDS; subclasses intercept replies."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """As Flower's: push, then collect the replies until all are in or `timeout` passes."""
        waiting = set(self.grid.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            got = list(self.grid.pull_messages(waiting))
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if not waiting or (end is not None and time.monotonic() >= end):
                break
            time.sleep(REPLY_POLL_SECONDS)
        return replies


class AuditedGrid(DelegatingGrid):
    """The grid the strategy talks to: every reply passes the allow-list before the strategy
    sees it, and (optionally) its shape goes to an audit log."""

    def __init__(
        self, grid: Grid, aggregation: str, audit_log: Path | None, secure: bool = False
    ) -> None:
        super().__init__(grid)
        self.aggregation = aggregation
        self.audit_log = audit_log
        self.secure = secure  # adapters arrive only masked, through SecAgg+
        # reply message id -> the node the instruction went to: the SuperLink answers for a node
        # that died with an error reply from itself, and the row must still name the tenant.
        self.senders: dict[str, int] = {}

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.check(m) for m in self.grid.pull_messages(message_ids)]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        sent = list(messages)
        replies = list(super().send_and_receive(sent, timeout=timeout))
        # Pushing gave every sent message its id.
        asked = {m.metadata.message_id: m for m in sent}
        out = []
        for r in replies:
            instruction = asked.get(r.metadata.reply_to_message_id)
            node = instruction.metadata.dst_node_id if instruction else r.metadata.src_node_id
            self.senders[r.metadata.message_id] = node
            out.append(self.check(r, instruction))
        return out

    def sender(self, msg: Message) -> int:
        return self.senders.get(msg.metadata.message_id, msg.metadata.src_node_id)

    def check(self, msg: Message, instruction: Message | None = None) -> Message:
        """The reply as the server may read it. A train or evaluate reply loses the fields not on
        the allow-list; a SecAgg+ reply (its stage is the instruction's) that breaks the list for
        its stage is replaced by an error: the protocol reads replies whole, and counts that
        tenant as dropped out instead of failing the run."""
        node, kind = self.sender(msg), msg.metadata.message_type
        stage = secagg_stage(instruction)
        entry: dict[str, Any] = {"node": node, "type": kind, "group_id": msg.metadata.group_id}
        if stage:
            entry["stage"] = stage
        if msg.has_error():
            entry["error"] = {"code": msg.error.code, "reason": msg.error.reason}
        elif stage and instruction is not None:
            entry["records"] = describe(msg.content)
            rejected = reply_violations(msg.content, stage, arrays_allowed=False)
            if rejected:
                log.warning(
                    "node %d: SecAgg+ %s reply not on the allow-list (%s): counted as a dropout",
                    node, stage, rejected,
                )  # fmt: skip
                entry["rejected"] = rejected
                msg = Message(
                    Error(ErrorCode.UNKNOWN, "secagg-reply-not-allowed"), reply_to=instruction
                )
        else:
            entry["records"] = describe(msg.content)
            phase = "train" if kind == MessageType.TRAIN else "evaluate"
            arrays = self.aggregation == "fedavg" and phase == "train" and not self.secure
            dropped = drop_disallowed(msg.content, phase, arrays)
            if dropped:
                log.warning(
                    "node %d: dropped reply fields not on the allow-list: %s", node, dropped
                )
                entry["dropped"] = dropped
        if self.audit_log is not None:
            with self.audit_log.open("a") as f:
                f.write(json.dumps(entry) + "\n")
        return msg


def secagg_stage(instruction: Message | None) -> str:
    """The SecAgg+ stage a server instruction starts ('' for a plain train or evaluate one)."""
    if instruction is None or SECAGG not in instruction.content.config_records:
        return ""
    stage = instruction.content.config_records[SECAGG].get(SecAggKey.STAGE, "")
    return stage if isinstance(stage, str) and stage in SECAGG_REPLIES else ""


def describe(content: RecordDict) -> dict[str, dict[str, str]]:
    """Each record's fields with their value types; only allow-listed identifiers show their
    value (the audit log must not hold what the allow-list keeps out)."""
    out: dict[str, dict[str, str]] = {}
    for name, record in content.items():
        fields: dict[str, str] = {}
        for key, value in record.items():
            shown = value_type(value)
            if name == INFO and key in INFO_FIELDS and isinstance(value, str):
                shown = f"str:{value}" if len(value) <= 64 else "str"
            fields[key] = shown
        out[f"{name}:{type(record).__name__}"] = fields
    return out


class GroupSum(Strategy):
    """The legacy strategy SecAggPlusWorkflow drives for one group in one round: it asks every
    member (the ClientManager holds only them) for the adapter it trained this round, and its
    `aggregate_fit` receives only what SecAgg+ unmasked: the workflow puts the group's weighted
    average into every member's result, so no member's own arrays ever reach it."""

    def __init__(self, server_round: int) -> None:
        self.config: dict[str, Scalar] = {
            "server-round": server_round,
            "clipping-range": CLIPPING_RANGE,
        }
        self.average: NDArrays | None = None
        self.count = 0  # members whose masked vectors are in the average

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        members = sorted(client_manager.all().items())
        return [(proxy, FitIns(parameters, dict(self.config))) for _, proxy in members]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if not results:
            return None, {}
        self.average = parameters_to_ndarrays(results[0][1].parameters)
        self.count = len(results)
        return results[0][1].parameters, {}

    # The rest of the legacy interface: the workflow uses none of it.
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return None


class GroupedFedAvg(FedAvg):
    """FedAvg whose average is taken per aggregation group (weighted by examples), in the clear or
    under SecAgg+ (`secure`); tenants in no group, and every tenant with aggregation "none", only
    train and report metrics."""

    def __init__(
        self,
        aggregation: str,
        min_nodes: int,
        table_path: Path | None,
        tenants: dict[str, str],
        grid: AuditedGrid | None = None,
        secure: bool = False,
        timeout: float | None = None,
    ) -> None:
        super().__init__(
            min_train_nodes=min_nodes,
            min_evaluate_nodes=min_nodes,
            min_available_nodes=min_nodes,
            weighted_by_key="num-examples",
        )
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.aggregation = aggregation
        self.secure = secure
        self.timeout = timeout  # for each SecAgg+ stage's replies
        self.table_path = table_path
        self.tenants = tenants  # the operator's: tenant id -> group
        self.grid = grid  # where replies came from (their sender, also for the SuperLink's)
        self.identity: dict[int, str] = {}  # node id -> tenant id (registered name)
        self.ignored: set[int] = set()  # nodes already logged as unknown
        self.members: dict[str, set[int]] = {}  # group -> nodes whose claim matched
        self.group_arrays: dict[str, ArrayRecord] = {}
        self.rows: dict[tuple[int, int], dict[str, Any]] = {}  # (round, node) -> row
        self.train_started: dict[int, float] = {}  # round -> when its train messages went out
        self.trained: dict[int, set[int]] = {}  # round -> nodes whose training succeeded
        self.asked: dict[int, set[int]] = {}  # round -> nodes sent a train message

    def group_of(self, node: int) -> str:
        return self.tenants.get(self.identity.get(node, ""), "")

    def known_nodes(self, grid: Grid) -> list[int]:
        """The connected nodes the operator registered under a tenant of its file."""
        for info in grid.get_nodes():
            node = info.node_id
            if info.name in self.tenants:
                self.identity[node] = info.name
            elif node not in self.ignored:
                self.ignored.add(node)
                log.warning(
                    "node %d (registered as %r) is not in the tenants file: ignored",
                    node, info.name,
                )  # fmt: skip
        return sorted(n for n in grid.get_node_ids() if n in self.identity)

    def _messages(
        self, server_round: int, config: ConfigRecord, node_ids: Iterable[int], kind: str
    ) -> list[Message]:
        config["server-round"] = server_round
        out = []
        for node in node_ids:
            record = RecordDict({CONFIG: config})
            group = self.group_of(node)
            member = node in self.members.get(group, set())
            if self.aggregation == "fedavg" and member and group in self.group_arrays:
                record[ARRAYS] = self.group_arrays[group]
            out.append(Message(content=record, message_type=kind, dst_node_id=node))
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.train_started[server_round] = time.perf_counter()
        sample_nodes(grid, self.min_available_nodes, self.min_train_nodes)
        # Every registered tenant trains, not a sample: each round is every tenant's training.
        nodes = self.known_nodes(grid)
        self.asked[server_round] = set(nodes)
        return self._messages(server_round, config, nodes, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # Only the adapters trained in this round are evaluated: a tenant that joined after the
        # train messages went out, or whose training failed, has nothing new (maybe nothing yet).
        trained = self.trained.get(server_round, set())
        return self._messages(server_round, config, sorted(trained), MessageType.EVALUATE)

    def sender(self, msg: Message) -> int:
        return self.grid.sender(msg) if self.grid else msg.metadata.src_node_id

    def _record(self, server_round: int, msg: Message, phase: str) -> dict[str, Any] | None:
        node = self.sender(msg)
        row = self.rows.setdefault(
            (server_round, node),
            {
                "round": server_round,
                "node": node,
                "tenant": self.identity.get(node, f"node-{node}"),
                "group": self.group_of(node),
            },
        )
        if msg.has_error():
            # Both phases can fail in one round: the evaluate error must not hide the train one.
            failure = f"{phase}: {msg.error.reason}"
            row["error"] = f"{row['error']}; {failure}" if "error" in row else failure
            log.warning(
                "round %d: %s failed in %s: %s", server_round, row["tenant"], phase,
                msg.error.reason,
            )  # fmt: skip
            return None
        info = dict(msg.content.config_records.get(INFO, ConfigRecord()))
        claim = str(info.pop("group", ""))
        if claim != row["group"] and claim:
            log.warning(
                "round %d: %s claims group %r but is assigned %r: claim ignored",
                server_round, row["tenant"], claim, row["group"] or "(private)",
            )  # fmt: skip
            row["claimed-group"] = claim
        elif claim and phase == "train":
            self.members.setdefault(claim, set()).add(node)
        row.update({k: v for k, v in info.items() if isinstance(v, str)})
        metrics: dict[str, Any] = dict(msg.content.metric_records.get(METRICS, MetricRecord()))
        if phase == "evaluate":
            # One row per tenant and round: the sample size must not hide the training pairs.
            metrics["eval-examples"] = metrics.pop("num-examples", 0)
            metrics["eval-seconds"] = metrics.pop("seconds", 0.0)
            if "state-loads" in metrics:
                metrics["eval-state-loads"] = metrics.pop("state-loads")
        row.update(metrics)
        if "peak-train-memory-bytes" in metrics:
            row["peak-train-memory-MB"] = metrics["peak-train-memory-bytes"] / 2**20
        return row

    def group_means(
        self, phase: str, replies: list[tuple[dict[str, Any], RecordDict]]
    ) -> MetricRecord:
        """Weighted means per group (a private tenant is its own group): never across tenants
        that do not train together."""
        by: dict[str, list[RecordDict]] = {}
        for row, content in replies:
            by.setdefault(row["group"] or row["tenant"], []).append(content)
        out = MetricRecord()
        for name, contents in sorted(by.items()):
            means = aggregate_metricrecords(contents, self.weighted_by_key)
            for key in SUMMARY[phase]:
                if key in means:
                    out[f"{name}/{key}"] = means[key]
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # The round's training as the server sees it: from sending the train messages to holding
        # every reply (the tenants' own train-seconds exclude start-up, transfer and scheduling).
        wall = time.perf_counter() - self.train_started.get(server_round, time.perf_counter())
        members: dict[str, dict[int, RecordDict]] = {}  # group -> its trained members' replies
        done = []
        for msg in replies:
            row = self._record(server_round, msg, "train")
            if row is None:
                continue
            node = self.sender(msg)
            self.trained.setdefault(server_round, set()).add(node)
            row["train-wall-seconds"] = wall
            # Every array the server ever receives is counted, whatever the tenant's settings.
            row["arrays-sent"] = sum(len(a) for a in msg.content.array_records.values())
            done.append((row, msg.content))
            group = row["group"]
            if group and node in self.members.get(group, set()):
                members.setdefault(group, {})[node] = msg.content
        for node in sorted(self.asked.get(server_round, set())):
            if (server_round, node) not in self.rows:
                # A tenant that died mid-round may get neither a reply nor the SuperLink's error
                # for it before the round times out: its row says so instead of vanishing.
                tenant = self.identity.get(node, f"node-{node}")
                self.rows[(server_round, node)] = {
                    "round": server_round, "node": node, "tenant": tenant,
                    "group": self.group_of(node), "error": "train: no reply within the round",
                }  # fmt: skip
                log.warning("round %d: %s sent no train reply", server_round, tenant)
        for group, contents in sorted(members.items()):
            started = time.perf_counter()
            if self.secure:
                weights = {n: self.weight(c) for n, c in contents.items()}
                average, count = self.secure_average(server_round, group, weights)
            else:
                shared = [c for c in contents.values() if ARRAYS in c]
                average = aggregate_arrayrecords(shared, self.weighted_by_key) if shared else None
                count = len(shared)
            for node in contents:
                self.rows[(server_round, node)]["averaged"] = count
                if self.secure:
                    self.rows[(server_round, node)]["secagg-seconds"] = (
                        time.perf_counter() - started
                    )
            if average is None:
                # Members keep this round's own adapters: an older average must not replace them.
                self.group_arrays.pop(group, None)
                continue
            self.group_arrays[group] = average
            log.info("round %d: averaged %d adapters of group %r", server_round, count, group)
        # The strategy's single global model stays empty: the averages live per group.
        return None, self.group_means("train", done) if done else None

    def weight(self, content: RecordDict) -> int:
        """A member's weight in its group's average: the examples its train reply reports."""
        value = content.metric_records.get(METRICS, MetricRecord()).get(self.weighted_by_key, 0)
        return int(value) if isinstance(value, int | float) else 0

    def secure_average(
        self, server_round: int, group: str, weights: dict[int, int]
    ) -> tuple[ArrayRecord | None, int]:
        """The group's average weighted by `weights` (member node -> num-examples) under SecAgg+,
        and how many members it covers; (None, 0) when there is none this round."""
        if len(weights) < MIN_SECURE_MEMBERS:
            log.warning(
                "round %d: group %r has %d member(s) that trained; SecAgg+ needs %d: not averaged "
                "(its adapters stay with their tenants)",
                server_round, group, len(weights), MIN_SECURE_MEMBERS,
            )  # fmt: skip
            return None, 0
        if self.grid is None:
            raise PemaError("secure aggregation needs the grid the strategy was started on")
        run_id = self.grid.run.run_id
        members = SimpleClientManager()
        for node in sorted(weights):
            members.register(GridClientProxy(node, self.grid, run_id))
        strategy = GroupSum(server_round)
        base = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
        context = LegacyContext(base, ServerConfig(num_rounds=server_round), strategy, members)
        context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
        context.state[MAIN_PARAMS_RECORD] = ArrayRecord()
        # The heaviest member weighs 1: the finest quantization the weights allow.
        workflow = SecAggPlusWorkflow(
            SECAGG_SHARES, SECAGG_THRESHOLD, max_weight=float(max(1, *weights.values())),
            clipping_range=CLIPPING_RANGE, timeout=self.timeout,
        )  # fmt: skip
        workflow(self.grid, context)
        if strategy.average is None:
            log.warning(
                "round %d: SecAgg+ halted for group %r (members lost before their masks could be "
                "removed): not averaged",
                server_round, group,
            )  # fmt: skip
            return None, 0
        return ArrayRecord(strategy.average), strategy.count

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        done = []
        for msg in replies:
            row = self._record(server_round, msg, "evaluate")
            if row is not None:
                done.append((row, msg.content))
        self.write_table(server_round)
        return self.group_means("evaluate", done) if done else None

    def write_table(self, server_round: int) -> None:
        rows = [r for (rnd, _), r in sorted(self.rows.items()) if rnd == server_round]
        # The whole round as the server sees it: training, any secure aggregation, evaluation.
        wall = time.perf_counter() - self.train_started.get(server_round, time.perf_counter())
        for row in rows:
            row["round-wall-seconds"] = wall
        log.info("round %d:\n%s", server_round, format_table(rows))
        if self.table_path is None:
            return
        self.table_path.parent.mkdir(parents=True, exist_ok=True)
        every = [r for _, r in sorted(self.rows.items())]
        self.table_path.write_text(format_table(every) + "\n")
        with self.table_path.with_suffix(".jsonl").open("a") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e3 else f"{value:.0f}"
    return SHORT.get(value, value) if isinstance(value, str) else value


def format_table(rows: list[dict[str, Any]]) -> str:
    """One row per tenant and round (at most 100 columns wide); failed steps are listed below
    the table with their error codes."""
    body = [[_cell(r.get(key)) for _, key in COLUMNS] for r in rows]
    # Columns are already two spaces apart; tabulate's extra padding would cost 26 characters.
    tabulate.MIN_PADDING = 0
    headers = [h for h, _ in COLUMNS]
    table = tabulate.tabulate(body, headers=headers, tablefmt="simple", missingval="")
    errors = [f"round {r['round']} {r['tenant']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join([table, *errors])


app = ServerApp()
plain_flower_logs()


@app.main()
def main(grid: Grid, context: Context) -> None:
    if not log.handlers:
        # The run's streamed log (`flwr run --stream`, `flwr log`) shows the table and warnings.
        log.addHandler(logging.StreamHandler())
        log.setLevel(logging.INFO)
    c = validated(RunConfig, dict(context.run_config), "run config")
    audit = Path(c.audit_log) if c.audit_log else None
    audited = AuditedGrid(grid, c.aggregation, audit, secure=c.secure)
    strategy = GroupedFedAvg(
        aggregation=c.aggregation,
        min_nodes=c.min_nodes,
        table_path=Path(c.round_table) if c.round_table else None,
        tenants=load_tenants(c.tenants_file),
        grid=audited,
        secure=c.secure,
        timeout=c.round_timeout,
    )
    if c.aggregation == "fedavg":
        how = "under SecAgg+ (the server sees only each group's average)"
        log.info("fedavg %s", how if c.secure else "in the clear (secure-aggregation = false)")
    strategy.start(
        grid=audited,
        initial_arrays=ArrayRecord(),
        num_rounds=c.num_server_rounds,
        timeout=c.round_timeout,
        train_config=ConfigRecord({"aggregation": c.aggregation}),
        evaluate_config=ConfigRecord({"aggregation": c.aggregation}),
    )
