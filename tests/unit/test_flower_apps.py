"""The Flower apps' configuration, reply allow-list and round table, without processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from coordinator.flower_server import GroupedFedAvg, format_table, load_tenants
from pema.errors import PemaError
from tenant.federation import INFO, METRICS, RunConfig, drop_disallowed, reply_violations
from tenant.federation import validated as validated_config
from tenant.steps import NodeConfig

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
