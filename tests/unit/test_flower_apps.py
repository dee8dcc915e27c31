"""The Flower apps' configuration, reply allow-list and round table, without processes."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.config import parse_config_args
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.task_identity import TaskIdentity

from coordinator.flower_server import (
    REPLY_POLL_SECONDS,
    DelegatingGrid,
    GroupedFedAvg,
    format_table,
    load_tenants,
)
from pema.adapter import PemaAdapter, save_adapter
from pema.errors import PemaError
from pema.prompts import DEFAULT_TEMPLATE
from tenant.demo import config_text
from tenant.federation import (
    INFO,
    METRICS,
    SECAGG,
    RunConfig,
    drop_disallowed,
    reply_violations,
)
from tenant.federation import validated as validated_config
from tenant.flower_client import Handler, secure_aggregation, upload
from tenant.steps import (
    NodeConfig,
    adapter_config,
    adapter_names,
    named_state,
    upload_arrays,
)

NODE = {"tenant-id": "acme", "train": "t.tsv", "valid": "v.tsv", "adapter-dir": "a"}


def test_node_config_accepts_its_keys() -> None:
    cfg = NodeConfig.from_values({**NODE, "threads": 2, "aggregation-group": "kjv"})
    assert cfg.threads == 2 and cfg.group == "kjv" and cfg.memory_mode == "teacher-forced"
    assert cfg.samples_path == Path("a.samples.jsonl")


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"aggregation_group": "kjv"}, "'aggregation_group'"),
        ({"pushgatway": "h:9091"}, "'pushgatway'"),
        ({"threads": "two"}, "'threads'"),
        ({"memory-mode": "free"}, "'memory-mode'"),
        ({"aggregation-group": "KJV group"}, "'aggregation-group'"),
        ({"tenant-id": "Bad Id"}, "'tenant-id'"),
    ],
)
def test_node_config_rejects_unknown_keys_and_bad_values_naming_the_key(
    extra: dict[str, object], named: str
) -> None:
    with pytest.raises(PemaError, match=named):
        NodeConfig.from_values({**NODE, **extra})


def test_the_coordinator_retry_budget_is_a_node_config_key_that_reaches_the_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tenant.steps as steps

    seen: dict[str, object] = {}
    monkeypatch.setattr(steps, "coordinator_backend", lambda *a, **kw: seen.update(kw))
    node = {**NODE, "coordinator": "127.0.0.1:1", "coordinator-retry-seconds": 7.5}
    steps.make_backend(NodeConfig.from_values(node))
    assert seen["retry_seconds"] == 7.5
    with pytest.raises(PemaError, match="'coordinator-retry-seconds'"):
        NodeConfig.from_values({**node, "coordinator-retry-seconds": -1})


def test_flower_log_lines_carry_no_colour_codes_outside_a_terminal() -> None:
    import logging
    import sys

    from flwr.common.logger import ConsoleHandler

    from tenant.federation import plain_flower_logs

    plain_flower_logs()  # pytest's captured stderr is not a terminal
    assert not sys.stderr.isatty()
    handlers = [h for h in logging.getLogger("flwr").handlers if isinstance(h, ConsoleHandler)]
    assert handlers
    record = logging.LogRecord("flwr", logging.INFO, __file__, 1, "round 1", None, None)
    assert all("\x1b" not in h.format(record) for h in handlers)


def test_node_config_names_a_missing_key() -> None:
    with pytest.raises(PemaError, match="'adapter-dir'"):
        NodeConfig.from_values({k: v for k, v in NODE.items() if k != "adapter-dir"})


def test_run_config_is_pyprojects_and_rejects_typos() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[2]
    defaults = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert validated_config(RunConfig, defaults, "run config").aggregation == "none"
    with pytest.raises(PemaError, match="unknown key 'agregation'"):
        validated_config(RunConfig, {**defaults, "agregation": "fedavg"}, "run config")
    with pytest.raises(PemaError, match="'aggregation'"):
        validated_config(RunConfig, {**defaults, "aggregation": "mean"}, "run config")


def reply(**info: str) -> RecordDict:
    return RecordDict(
        {METRICS: MetricRecord({"num-examples": 3, "bleu": 1.5}), INFO: ConfigRecord(info)}
    )


def test_the_allow_list_names_every_field_that_is_not_a_number_or_identifier() -> None:
    assert reply_violations(reply(group="kjv"), "evaluate", arrays_allowed=False) == []
    assert reply_violations(reply(group=""), "evaluate", arrays_allowed=False) == []
    text = reply(group="kjv", **{"sample-output": "Thou shalt"})
    assert reply_violations(text, "evaluate", False) == [f"{INFO}.sample-output"]
    assert reply_violations(reply(group="/data/private"), "evaluate", False) == [f"{INFO}.group"]
    # bleu is an evaluate number, not a train one; arrays only where the run aggregates.
    assert reply_violations(reply(), "train", False) == [f"{METRICS}.bleu"]
    with_arrays = reply()
    with_arrays["arrays"] = ArrayRecord()
    assert reply_violations(with_arrays, "evaluate", arrays_allowed=False) == ["arrays"]
    assert reply_violations(with_arrays, "evaluate", arrays_allowed=True) == []
    assert drop_disallowed(text, "evaluate", False) == [f"{INFO}.sample-output"]
    assert dict(text[INFO]) == {"group": "kjv"}


def test_tenants_file_from_a_file_or_a_configmap_folder(tmp_path: Path) -> None:
    one = tmp_path / "tenants.json"
    one.write_text(json.dumps({"tenants": {"a": {"group": "kjv"}, "b": {}}}))
    assert load_tenants(str(one)) == {"a": "kjv", "b": ""}
    folder = tmp_path / "cm"
    folder.mkdir()
    (folder / "a.json").write_text('{"group": "kjv"}')
    (folder / "README").write_text("not a tenant")
    assert load_tenants(str(folder)) == {"a": "kjv"}
    (folder / "b.json").write_text('{"grup": "kjv"}')
    with pytest.raises(PemaError, match=r"'tenants\.b\.grup'"):
        load_tenants(str(folder))
    with pytest.raises(PemaError, match="tenants-file"):
        load_tenants("")


def test_round_table_fits_100_columns_and_failed_rows_keep_the_tenant() -> None:
    ok = {
        "round": 3, "tenant": "kjv-genesis", "group": "kjv", "memory-mode": "teacher-forced",
        "started-from": "checkpoint", "train-keys": 30887, "memory-build-seconds": 148.21,
        "train-seconds": 175.9, "peak-train-memory-MB": 774.31, "valid-loss": 1.2345,
        "bleu": 26.61, "chrf": 47.02, "arrays-sent": 3,
    }  # fmt: skip
    failed = {"round": 3, "tenant": "kjv-style", "group": "", "error": "train: train-failed:X"}
    table = format_table([ok, failed])
    assert max(len(line) for line in table.splitlines()) <= 100, table
    assert "kjv-style" in table.splitlines()[3]
    assert table.splitlines()[-1] == "round 3 kjv-style: train: train-failed:X"


def test_the_summary_line_averages_within_groups_only() -> None:
    s = GroupedFedAvg("fedavg", 1, None, {"a": "kjv", "b": "kjv", "c": ""})

    def row(tenant: str, group: str, bleu: float) -> tuple[dict[str, str], RecordDict]:
        content = RecordDict({METRICS: MetricRecord({"num-examples": 2, "bleu": bleu})})
        return {"tenant": tenant, "group": group}, content

    means = s.group_means(
        "evaluate", [row("a", "kjv", 10.0), row("b", "kjv", 20.0), row("c", "", 1.0)]
    )
    assert dict(means) == {"kjv/bleu": 15.0, "c/bleu": 1.0}


def test_secure_aggregation_is_on_with_fedavg_unless_turned_off() -> None:
    def run(**values: object) -> RunConfig:
        return validated_config(RunConfig, values, "run config")

    assert run(aggregation="fedavg").secure
    assert not run(aggregation="fedavg", **{"secure-aggregation": False}).secure
    assert not run(aggregation="none").secure  # nothing is averaged, nothing to secure


def masked(*arrays: np.ndarray) -> list[bytes]:
    return [ndarray_to_bytes(a) for a in arrays]


def secagg_reply(stage: str, **fields: object) -> RecordDict:
    """A SecAgg+ reply as secaggplus_mod builds it; the masked stage's with its emptied FitRes."""
    content = RecordDict()
    if stage == Stage.COLLECT_MASKED_VECTORS:
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.ones(2)]), 24, {})
        content = compat.fitres_to_recorddict(fitres, keep_input=False)
        content.array_records["fitres.parameters"].clear()
    content[SECAGG] = ConfigRecord(fields)  # type: ignore[arg-type]
    return content


GOOD = {
    Stage.SETUP: {Key.PUBLIC_KEY_1: b"pk1", Key.PUBLIC_KEY_2: b"pk2"},
    Stage.SHARE_KEYS: {Key.DESTINATION_LIST: [7, 9], Key.CIPHERTEXT_LIST: [b"c7", b"c9"]},
    Stage.COLLECT_MASKED_VECTORS: {
        Key.MASKED_PARAMETERS: masked(np.array([3], np.int64), np.arange(4, dtype=np.int64))
    },
    Stage.UNMASK: {Key.NODE_ID_LIST: [7], Key.SHARE_LIST: [b"share"]},
}


@pytest.mark.parametrize("stage", list(GOOD))
def test_each_secagg_stage_reply_carries_exactly_its_protocol_fields(stage: str) -> None:
    assert reply_violations(secagg_reply(stage, **GOOD[stage]), stage, False) == []
    # Text, a missing field or a field of another stage is named; so is a record of anything else.
    extra = secagg_reply(stage, **GOOD[stage], note="hello")
    assert reply_violations(extra, stage, False) == [f"{SECAGG}.note"]
    first = next(iter(GOOD[stage]))
    missing = secagg_reply(stage, **{k: v for k, v in GOOD[stage].items() if k != first})
    assert reply_violations(missing, stage, False) == [f"{SECAGG}.{first}"]
    with_metrics = secagg_reply(stage, **GOOD[stage])
    with_metrics[METRICS] = MetricRecord({"train-loss": 1.0})
    assert reply_violations(with_metrics, stage, False) == [METRICS]
    other = Stage.UNMASK if stage != Stage.UNMASK else Stage.SETUP
    assert reply_violations(secagg_reply(stage, **GOOD[other]), stage, False)


def test_a_masked_vector_stage_reply_never_carries_an_adapter() -> None:
    stage = Stage.COLLECT_MASKED_VECTORS
    adapter = np.full((2, 3), 0.25, np.float32)
    # The adapter itself in place of the masked vector: floats, refused.
    raw = secagg_reply(stage, **{Key.MASKED_PARAMETERS: masked(np.array([3]), adapter)})
    assert reply_violations(raw, stage, False) == [f"{SECAGG}.{Key.MASKED_PARAMETERS}"]
    garbage = secagg_reply(stage, **{Key.MASKED_PARAMETERS: [b"not an array"]})
    assert reply_violations(garbage, stage, False) == [f"{SECAGG}.{Key.MASKED_PARAMETERS}"]
    # The FitRes arrays not emptied (the mod did not run), or a status with text: refused.
    unmasked = secagg_reply(stage, **GOOD[stage])
    unmasked.array_records["fitres.parameters"] = ArrayRecord([adapter])
    assert reply_violations(unmasked, stage, False) == ["fitres.parameters.0"]
    chatty = secagg_reply(stage, **GOOD[stage])
    chatty.config_records["fitres.status"]["message"] = "trained on /data/acme.tsv"
    assert reply_violations(chatty, stage, False) == ["fitres.status.message"]


def test_an_upload_fails_rather_than_have_its_adapter_clipped() -> None:
    state = {"A": torch.tensor([[0.5, -0.25]]), "B": torch.tensor([7.9])}
    arrays = upload_arrays(state, clipping_range=8.0)
    assert [a.tolist() for a in arrays] == [[[0.5, -0.25]], [7.900000095367432]]
    with pytest.raises(PemaError, match="clipping range"):
        upload_arrays({**state, "C": torch.tensor([-8.5])}, clipping_range=8.0)


def test_a_group_average_comes_back_in_the_adapters_parameter_order() -> None:
    names = adapter_names()
    adapter = PemaAdapter(adapter_config(DEFAULT_TEMPLATE))
    arrays = upload_arrays(adapter.state_dict(), clipping_range=8.0)
    # What SecAgg+ returns: unnamed float64 arrays, in the order they were sent.
    state = named_state([a.astype(np.float64) for a in arrays], names)
    assert list(state) == names == list(adapter.state_dict())
    adapter.load_state_dict(state)
    with pytest.raises(PemaError, match="has 2 arrays, this adapter 3"):
        named_state(arrays[:2], names)


def test_a_group_with_one_member_that_trained_is_not_averaged_under_secagg() -> None:
    s = GroupedFedAvg("fedavg", 1, None, {"a": "solo"}, secure=True)
    # No protocol, no grid needed: a lone member's sum would be its own adapter.
    assert s.secure_average(1, "solo", {5: 24}) == (None, 0)
    with pytest.raises(PemaError, match="needs the grid"):
        s.secure_average(1, "kjv", {5: 24, 6: 24})


@pytest.fixture
def run_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run, node and task of a Flower process (its runtime sets them; messages are stamped
    with them)."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def upload_request(clipping_range: float = 8.0) -> Message:
    content = RecordDict(
        {
            "fitins.config": ConfigRecord({"server-round": 1, "clipping-range": clipping_range}),
            SECAGG: ConfigRecord({}),
        }
    )
    return Message(content, dst_node_id=2, message_type="train")


def test_the_upload_sends_the_trained_adapter_to_the_secagg_mod_only_when_opted_in(
    tmp_path: Path, run_identity: None
) -> None:
    adapter = PemaAdapter(adapter_config(DEFAULT_TEMPLATE))
    save_adapter(adapter, tmp_path / "a", extra={"training": {"train_pairs": 24}})
    node = {**NODE, "adapter-dir": str(tmp_path / "a"), "aggregation-group": "kjv"}
    runs = {"aggregation": "fedavg"}
    ctx = Context(run_id=1, node_id=2, node_config=node, state=RecordDict(), run_config=runs)
    reply = upload(upload_request(), ctx)
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    assert fitres.num_examples == 24
    sent = parameters_to_ndarrays(fitres.parameters)
    expected = adapter.state_dict()
    assert all(
        np.array_equal(a, expected[n].numpy()) for a, n in zip(sent, adapter_names(), strict=True)
    )
    # The clipping check fails the upload with its class only.
    clipped = upload(upload_request(clipping_range=1e-9), ctx)
    assert clipped.has_error() and clipped.error.reason == "upload-failed:PemaError"
    # A tenant in no group, or a run that averages in the clear, never uploads through SecAgg+.
    for n, r in (
        ({**node, "aggregation-group": ""}, runs),
        (node, {**runs, "secure-aggregation": False}),
    ):
        ctx = Context(run_id=1, node_id=2, node_config=n, state=RecordDict(), run_config=r)
        refused = upload(upload_request(), ctx)
        assert refused.has_error() and refused.error.reason == "upload-failed:PemaError"


def test_config_text_is_what_flwr_parses_booleans_included() -> None:
    values = {"rounds": 3, "lr": 0.5, "secure-aggregation": False, "audit-log": "/tmp/a b.jsonl"}
    for quote in ("'", '"'):
        assert parse_config_args([config_text(values, quote)]) == values


def stage_message(node: int, fields: dict[str, object]) -> Message:
    return Message(
        RecordDict({SECAGG: ConfigRecord(fields)}), dst_node_id=node, message_type="train"
    )  # type: ignore[arg-type]


def test_the_secagg_mod_sends_only_allowed_replies_and_private_errors(run_identity: None) -> None:
    """Two tenants' side of SecAgg+ up to the masked vectors, in this process (Flower's own
    secaggplus_mod under `secure_aggregation`): each reply is on the allow-list for its stage; a
    masked-vector reply the step padded with another record is refused, and a step that failed
    passes its private reason on."""
    nodes = [11, 22]
    contexts = {
        n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
        for n in nodes
    }

    def never(msg: Message, context: Context) -> Message:
        raise AssertionError("no step before the masked-vector stage")

    setup = {
        Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 2, Key.SHARE_NUMBER: 2, Key.THRESHOLD: 2,
        Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 2**22, Key.MOD_RANGE: 2**32,
        Key.MAX_WEIGHT: 24.0,
    }  # fmt: skip
    keys: dict[str, object] = {}
    for n in nodes:
        reply = secure_aggregation(stage_message(n, setup), contexts[n], never)
        assert not reply.has_error() and reply_violations(reply.content, Stage.SETUP, False) == []
        r = reply.content[SECAGG]
        keys[str(n)] = [r[Key.PUBLIC_KEY_1], r[Key.PUBLIC_KEY_2]]
    sent: dict[int, dict[int, bytes]] = {}  # source -> destination -> ciphertext
    for n in nodes:
        share = {Key.STAGE: Stage.SHARE_KEYS, **keys}
        reply = secure_aggregation(stage_message(n, share), contexts[n], never)
        r = reply.content[SECAGG]
        sent[n] = dict(zip(r[Key.DESTINATION_LIST], r[Key.CIPHERTEXT_LIST], strict=True))  # type: ignore[arg-type]

    def collect(step: Handler) -> Message:
        node, other = nodes
        fields = {
            Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
            Key.CIPHERTEXT_LIST: [sent[other][node]],
            Key.SOURCE_LIST: [other],
        }
        # A fresh copy of the node's protocol state for each way the step can end.
        return secure_aggregation(stage_message(node, fields), copy.deepcopy(contexts[node]), step)

    def adapter(msg: Message, context: Context) -> Message:
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.ones(3)]), 24, {})
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    def padded(msg: Message, context: Context) -> Message:
        reply = adapter(msg, context)
        reply.content[METRICS] = MetricRecord({"train-loss": 1.0})
        return reply

    def failed(msg: Message, context: Context) -> Message:
        return Message(Error(2, "upload-failed:AdapterError"), reply_to=msg)

    masked = collect(adapter)
    assert not masked.has_error()
    assert reply_violations(masked.content, Stage.COLLECT_MASKED_VECTORS, False) == []
    assert len(masked.content.array_records["fitres.parameters"]) == 0
    assert collect(padded).error.reason == "secagg-failed:PemaError"
    assert collect(failed).error.reason == "upload-failed:AdapterError"


class SlowGrid(DelegatingGrid):
    """Answers each pushed message on the third pull after it (as a SuperLink whose nodes
    take a while), counting the pulls."""

    def __init__(self) -> None:
        self.pulls = 0
        self.pending: dict[str, Message] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"m{len(self.pending)}"
            ids.append(m.metadata.message_id)
            self.pending[m.metadata.message_id] = m
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        if self.pulls < 3:
            return []
        return [Message(RecordDict(), reply_to=self.pending[i]) for i in message_ids]


def instruction(node: int) -> Message:
    return Message(RecordDict(), dst_node_id=node, message_type="train", group_id="1")


def test_the_grid_collects_every_reply_polling_faster_than_flowers_3_s(
    monkeypatch: pytest.MonkeyPatch, run_identity: None
) -> None:
    slept: list[float] = []
    monkeypatch.setattr("coordinator.flower_server.time.sleep", slept.append)
    inner = SlowGrid()
    replies = list(DelegatingGrid(inner).send_and_receive([instruction(1), instruction(2)]))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert inner.pulls == 3 and slept == [REPLY_POLL_SECONDS] * 2 and REPLY_POLL_SECONDS < 3


def test_the_grid_gives_up_at_the_timeout_with_the_replies_it_has(run_identity: None) -> None:
    inner = SlowGrid()
    started = time.monotonic()
    replies = list(DelegatingGrid(inner).send_and_receive([instruction(1)], timeout=0.05))
    assert replies == [] and time.monotonic() - started < 1
