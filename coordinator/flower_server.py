"""The Flower ServerApp: schedules tenant rounds, averages adapters only within aggregation groups,
and logs a per-round table of every tenant's metrics (also written to `round-table`, with a JSON
Lines copy next to it).

Tenants announce their id and group in every reply, so the server needs no tenant registry; a
tenant without a group (or any tenant when `aggregation = "none"`) never sends arrays, and the
table records how many arrays each reply carried so that this can be checked.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, sample_nodes

log = logging.getLogger(__name__)

ARRAYS, CONFIG, TENANT, METRICS = "arrays", "config", "tenant", "metrics"
AGGREGATIONS = ("none", "fedavg")
COLUMNS = [
    ("round", "round"),
    ("tenant", "tenant"),
    ("group", "group"),
    ("start", "started_from"),
    ("pairs", "num-examples"),
    ("keys", "train-keys"),
    ("cache", "cache-hit"),
    ("mem s", "memory-build-seconds"),
    ("train s", "train-seconds"),
    ("step s", "step-seconds"),
    ("round s", "round-seconds"),
    ("fit wall s", "train-wall-seconds"),
    ("peak MB", "peak-train-memory-MB"),
    ("train loss", "train-loss"),
    ("valid loss", "valid-loss"),
    ("top1", "valid-top1"),
    ("BLEU", "bleu"),
    ("chrF", "chrf"),
    ("arrays out", "arrays-sent"),
]


class GroupedFedAvg(FedAvg):
    """FedAvg whose average is taken per aggregation group (weighted by examples); tenants in no
    group, and every tenant with aggregation "none", only train and report metrics."""

    def __init__(self, aggregation: str, min_nodes: int, table_path: Path | None) -> None:
        super().__init__(
            min_train_nodes=min_nodes,
            min_evaluate_nodes=min_nodes,
            min_available_nodes=min_nodes,
            weighted_by_key="num-examples",
        )
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.aggregation = aggregation
        self.table_path = table_path
        self.node_group: dict[int, str] = {}  # learned from replies
        self.group_arrays: dict[str, ArrayRecord] = {}
        self.rows: dict[tuple[int, int], dict[str, Any]] = {}  # (round, node) -> row
        self.train_started: dict[int, float] = {}  # round -> when its train messages went out
        self.trained: dict[int, set[int]] = {}  # round -> nodes whose training succeeded

    def _messages(
        self, server_round: int, config: ConfigRecord, node_ids: Iterable[int], kind: str
    ) -> list[Message]:
        config["server-round"] = server_round
        out = []
        for node in node_ids:
            record = RecordDict({CONFIG: config})
            group = self.node_group.get(node, "")
            if self.aggregation == "fedavg" and group in self.group_arrays:
                record[ARRAYS] = self.group_arrays[group]
            out.append(Message(content=record, message_type=kind, dst_node_id=node))
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.train_started[server_round] = time.perf_counter()
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, self.min_train_nodes)
        # Every connected tenant trains, not a sample: each round is every tenant's own training.
        everyone = sorted(set(node_ids) | set(grid.get_node_ids()))
        return self._messages(server_round, config, everyone, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # Only the adapters trained in this round are evaluated: a tenant that joined after the
        # train messages went out, or whose training failed, has nothing new (maybe nothing yet).
        trained = self.trained.get(server_round, set())
        return self._messages(server_round, config, sorted(trained), MessageType.EVALUATE)

    def _record(self, server_round: int, msg: Message, phase: str) -> dict[str, Any] | None:
        node = msg.metadata.src_node_id
        row = self.rows.setdefault((server_round, node), {"round": server_round, "node": node})
        if msg.has_error():
            # Both phases can fail in one round: the evaluate error must not hide the train one.
            failure = f"{phase}: {msg.error.reason}"
            row["error"] = f"{row['error']}; {failure}" if "error" in row else failure
            log.warning(
                "round %d: node %d failed in %s: %s", server_round, node, phase, msg.error.reason
            )
            return None
        info = dict(msg.content.config_records.get(TENANT, ConfigRecord()))
        row["tenant"] = str(info.get("tenant-id", f"node-{node}"))
        row["group"] = str(info.get("group", ""))
        self.node_group[node] = row["group"]
        for key, value in info.items():
            if key.startswith(("sample-", "started_from")):
                row[key] = value
        metrics: dict[str, Any] = dict(msg.content.metric_records.get(METRICS, MetricRecord()))
        if phase == "evaluate":
            # One row per tenant and round: the sample size must not hide the training pairs.
            metrics["eval-examples"] = metrics.pop("num-examples", 0)
        row.update(metrics)
        if "peak-train-memory-bytes" in metrics:
            row["peak-train-memory-MB"] = metrics["peak-train-memory-bytes"] / 2**20
        return row

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # The round's training as the server sees it: from sending the train messages to holding
        # every reply (the tenants' own train-seconds exclude start-up, transfer and scheduling).
        wall = time.perf_counter() - self.train_started.get(server_round, time.perf_counter())
        by_group: dict[str, list[RecordDict]] = {}
        contents = []
        for msg in replies:
            row = self._record(server_round, msg, "train")
            if row is None:
                continue
            self.trained.setdefault(server_round, set()).add(msg.metadata.src_node_id)
            row["train-wall-seconds"] = wall
            # Every array the server ever receives is counted, whatever the tenant's settings.
            row["arrays-sent"] = sum(len(a) for a in msg.content.array_records.values())
            contents.append(msg.content)
            if self.aggregation == "fedavg" and row["group"] and ARRAYS in msg.content:
                by_group.setdefault(row["group"], []).append(msg.content)
        for group, members in by_group.items():
            self.group_arrays[group] = aggregate_arrayrecords(members, self.weighted_by_key)
            log.info(
                "round %d: averaged %d adapters of group %r", server_round, len(members), group
            )
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key) if contents else None
        # The strategy's single global model stays empty: the averages live per group.
        return None, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        contents = []
        for msg in replies:
            row = self._record(server_round, msg, "evaluate")
            if row is not None:
                contents.append(msg.content)
        self.write_table(server_round)
        return self.evaluate_metrics_aggr_fn(contents, self.weighted_by_key) if contents else None

    def write_table(self, server_round: int) -> None:
        rows = [r for (rnd, _), r in sorted(self.rows.items()) if rnd == server_round]
        log.info("round %d:\n%s", server_round, format_table(rows))
        if self.table_path is None:
            return
        self.table_path.parent.mkdir(parents=True, exist_ok=True)
        every = [r for _, r in sorted(self.rows.items())]
        self.table_path.write_text(format_table(every) + "\n")
        with self.table_path.with_suffix(".jsonl").open("a") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return "" if value is None else str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table, one row per tenant and round; failed rounds show their error."""
    head = [name for name, _ in COLUMNS] + ["error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_cell(r.get(key)) for _, key in COLUMNS] + [str(r.get("error", ""))[:200]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    c: dict[str, Any] = dict(context.run_config)
    table = str(c.get("round-table", ""))
    strategy = GroupedFedAvg(
        aggregation=str(c.get("aggregation", "none")),
        min_nodes=int(c.get("min-nodes", 2)),
        table_path=Path(table) if table else None,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(),
        num_rounds=int(c.get("num-server-rounds", 2)),
        timeout=float(c.get("round-timeout", 1800)),
        train_config=ConfigRecord({"aggregation": strategy.aggregation}),
        evaluate_config=ConfigRecord({"aggregation": strategy.aggregation}),
    )
