"""Federated rounds with real processes: a coordinator serving a tiny random Llama model, the
SuperLink (TLS, SuperNode authentication, Fleet API on its own port), authenticated
flower-supernodes, `flwr run`, and a Prometheus server scraping each tenant's metrics exporter
and the coordinator. Every message the ServerApp receives is recorded (run config `audit-log`)
and checked against the reply allow-list; the secure-aggregation test also runs the apps
instrumented (secagg_probe.py) to record every value server code sees. Every process is stopped
at the end, also when a test fails.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import ssl
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from flwr.app import Array
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage
from safetensors.torch import load_file
from secagg_probe import TAMPERED_FIELD, probe_app, read_record
from tiny_model import KJV, save_tiny_model

from pema.adapter import WEIGHTS_FILE
from pema.data import read_pairs
from tenant.demo import (
    Federation,
    Monitoring,
    Processes,
    promql,
    read_rows,
    read_samples,
    start_coordinator,
    start_metrics,
    start_worker,
    wait_for,
    write_pairs,
)
from tenant.federation import (
    ARRAYS,
    EVALUATE_METRICS,
    FITRES_RECORDS,
    INFO,
    INFO_FIELDS,
    METRICS,
    SECAGG,
    SECAGG_REPLIES,
    TRAIN_METRICS,
)
from tenant.steps import adapter_names

REDIS_URL = "redis://127.0.0.1:6379/0"
ROUNDS = 2
MODES = ("none", "fedavg")


@dataclass
class Services:
    workdir: Path
    tenants: dict[str, list[str]]  # aggregation mode -> its two tenant ids
    tokens: dict[str, str]
    coordinator: str
    coordinator_metrics: str
    metrics: Monitoring


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed: run `make metrics-deps`")
    workdir = tmp_path_factory.mktemp("federation")
    model = save_tiny_model(workdir / "model")
    run = uuid.uuid4().hex[:8]
    tenants = {m: [f"fed-{m}-{run}-{i}" for i in range(2)] for m in MODES}
    tenants["secure"] = [f"fed-secure-{run}-{i}" for i in range(4)]
    tokens = {t: uuid.uuid4().hex for ts in tenants.values() for t in ts}
    procs = Processes(workdir / "logs")
    try:
        coordinator, coordinator_metrics = start_coordinator(procs, model, tokens, workdir)
        # Metrics are checked in the two-tenant runs only.
        scraped = [t for m in MODES for t in tenants[m]]
        metrics = start_metrics(procs, workdir, [coordinator_metrics.split("/")[2]], scraped)
        assert metrics is not None
        yield Services(workdir, tenants, tokens, coordinator, coordinator_metrics, metrics)
    finally:
        procs.stop_all()
        client = redis.Redis.from_url(REDIS_URL)
        for t in tokens:
            keys = list(client.scan_iter(match=f"pema:{t}:*"))
            if keys:
                client.delete(*keys)


def assert_only_allowed(audit: Path, aggregation: str, private: list[str]) -> list[dict]:
    """Every reply the ServerApp received carries only allow-listed fields, no reply field was
    dropped (the tenants built them right), error replies say a phase and a class, and none of
    the tenants' private strings appears in the record."""
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    assert entries
    for e in entries:
        assert "dropped" not in e, e
        if "error" in e:
            if e["error"]["code"] == 2:  # raised in the ClientApp: the tenant's own reply
                reason = e["error"]["reason"]
                assert re.fullmatch(r"(train|evaluate|upload|secagg)-failed:\w+", reason), e
            continue
        if "stage" in e:
            assert_secagg_entry(e)
            continue
        allowed = TRAIN_METRICS if e["type"] == "train" else EVALUATE_METRICS
        for record, fields in e["records"].items():
            name, kind = record.split(":")
            if kind == "MetricRecord":
                assert name == METRICS and set(fields) <= allowed, e
                assert set(fields.values()) <= {"int", "float"}, e
            elif kind == "ConfigRecord":
                assert name == INFO and set(fields) <= set(INFO_FIELDS), e
                assert all(v.startswith("str:") for v in fields.values()), e
            else:
                assert kind == "ArrayRecord" and name == ARRAYS, e
                assert aggregation == "fedavg" and e["type"] == "train", e
    assert_absent(private, audit)
    return entries


def assert_secagg_entry(e: dict) -> None:
    """A SecAgg+ reply as the audit log shows it: the stage's protocol fields with their types,
    and in the masked-vector stage the FitRes records with an empty ArrayRecord; no arrays."""
    assert e["type"] == "train" and e["stage"] in SECAGG_REPLIES, e
    expected = {f"{SECAGG}:ConfigRecord": SECAGG_REPLIES[e["stage"]]}
    if e["stage"] == Stage.COLLECT_MASKED_VECTORS:
        expected |= {f"{n}:{kind.__name__}": f for n, (kind, f) in FITRES_RECORDS.items()}
    records = dict(e["records"])
    if "rejected" in e:  # the tampering tenant: its extra field is named, nothing else
        assert e["rejected"] == [f"{SECAGG}.{TAMPERED_FIELD}"], e
        assert records[f"{SECAGG}:ConfigRecord"].pop(TAMPERED_FIELD) == "str", e
    assert records == expected, e


def assert_absent(private: list[str], *files: Path) -> None:
    for f in files:
        text = f.read_text(errors="replace")
        for s in private:
            assert s not in text, f"{s!r} reached {f.name}"


def private_texts(samples: Path) -> list[str]:
    """What the tenant's evaluate step keeps to itself (long enough not to match by chance)."""
    out = {v for r in read_samples(samples).values() for k, v in r.items() if k != "round"}
    return [v for v in out if isinstance(v, str) and len(v.strip()) >= 12]


def weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / WEIGHTS_FILE))


def node_config(
    services: Services,
    run_dir: Path,
    tenant: str,
    train: Path,
    extra: dict[str, Any] | None = None,
    redis: bool = True,
) -> dict[str, Any]:
    """A tenant's node config in these runs: its token, the coordinator, `train`, the first 8
    valid pairs, its own adapter folder, the run's memory cache (Redis unless `redis` is off);
    `extra` adds keys."""
    return {
        "tenant-id": tenant,
        "token": services.tokens[tenant],
        "coordinator": services.coordinator,
        "train": train,
        "valid": KJV / "valid.tsv",
        "max-valid-pairs": 8,
        "adapter-dir": run_dir / "adapters" / tenant,
        **({"redis-url": REDIS_URL} if redis else {}),
        "cache-dir": run_dir / "cache",
        **(extra or {}),
    }


def spread_slice(run_dir: Path, i: int) -> Path:
    """The i-th tenant's 24 training pairs, a thousand pairs apart: different book slices, so
    that adapters not averaged must end up different."""
    pairs = read_pairs(KJV / "train.tsv", 1000 * i + 24)[1000 * i :]
    return write_pairs(run_dir / f"train-{i}.tsv", pairs)


def test_two_tenants_two_rounds(services: Services) -> None:
    """A fedavg group of two in the clear. (Private tenants, which no array leaves, are the
    trust and worker tests' tenants below.)"""
    aggregation = "fedavg"
    run_dir = services.workdir / aggregation
    tenants = services.tenants[aggregation]
    procs = Processes(run_dir / "logs")
    try:
        fed = Federation(procs, run_dir)
        for i, tenant in enumerate(tenants):
            extra = {
                "test": KJV / "test.tsv",
                "aggregation-group": "kjv",
                "metrics-file": services.metrics.files[tenant],
            }
            fed.add_node(
                tenant, node_config(services, run_dir, tenant, spread_slice(run_dir, i), extra)
            )
        table = fed.run(
            {
                "num-server-rounds": ROUNDS,
                "aggregation": aggregation,
                # fedavg in the clear: the server reads each adapter (the secure path has its own
                # test below).
                "secure-aggregation": False,
                "eval-sample-size": 2,
                "shard-pairs": 8,
                "audit-log": str(run_dir / "audit.jsonl"),
            },
            timeout=1200,
        )
    finally:
        procs.stop_all()
    print(table.read_text())
    rows = read_rows(table)
    assert sorted((r["round"], r["tenant"]) for r in rows) == sorted(
        (rnd, t) for rnd in range(1, ROUNDS + 1) for t in tenants
    )
    for r in rows:
        assert "error" not in r, r
        assert r["num-examples"] == 24 and r["train-keys"] > 0
        assert r["peak-train-memory-bytes"] > 0 and r["train-seconds"] > 0
        # The server's view of a round's training holds the tenant's whole train step.
        assert r["train-wall-seconds"] >= r["round-seconds"] >= r["train-seconds"]
        assert {"bleu", "chrf", "valid-loss"} <= r.keys()
        # Round 2 reads both memories from Redis (same tenant, same data).
        assert r["cache-hit"] == (1 if r["round"] > 1 else 0)
        assert r["group"] == "kjv" and r["memory-mode"] == "teacher-forced"
    # Nothing but numbers and closed-set identifiers reached the server; the sample generations
    # stayed in each tenant's own log.
    private = [t for d in (run_dir / "adapters").glob("*.samples.jsonl") for t in private_texts(d)]
    assert private
    entries = assert_only_allowed(run_dir / "audit.jsonl", aggregation, private)
    assert len(entries) == 2 * 2 * ROUNDS  # train + evaluate, two tenants, every round
    assert_absent(private, table, table.with_suffix(".jsonl"), run_dir / "flwr-rounds.log")
    # The run's logs (SuperLink, SuperNodes, `flwr run`) are plain text, without colour codes.
    logs = [run_dir / "flwr-rounds.log", *(run_dir / "logs").glob("*.log")]
    assert len(logs) >= 4 and all("\x1b[" not in p.read_text() for p in logs)
    adapters = [run_dir / "adapters" / t for t in tenants]
    assert all((a / WEIGHTS_FILE).is_file() for a in adapters)
    a, b = (weights(d) for d in adapters)
    assert all(r["arrays-sent"] > 0 for r in rows)
    assert {r["started-from"] for r in rows if r["round"] > 1} == {"group"}
    assert all(torch.equal(a[k], b[k]) for k in a)

    # Prometheus scraped every tenant's training figures from its exporter, labelled by target.
    selector = '{tenant=~"' + "|".join(tenants) + '"}'
    for metric in (
        "pema_tenant_train_peak_memory_bytes",
        "pema_tenant_train_step_seconds",
        "pema_tenant_round_seconds",
    ):
        result = wait_for(
            lambda m=metric: len(r := promql(services.metrics.prometheus, m + selector)) == 2 and r,  # type: ignore[misc]
            f"{metric} in Prometheus",
            timeout=60,
        )
        assert {s["metric"]["tenant"] for s in result} == set(tenants)
        assert all(float(s["value"][1]) > 0 for s in result)
    hits = promql(services.metrics.prometheus, "pema_tenant_cache_hits_total" + selector)
    assert {float(s["value"][1]) for s in hits} == {ROUNDS - 1.0}
    # The tenant label is the scrape target's (as a pod's in the cluster): the exporters' own
    # series carry none, so nothing a tenant process writes can name another tenant.
    for t in tenants:
        with urllib.request.urlopen(f"http://{services.metrics.exporters[t]}/metrics") as r:
            assert "tenant=" not in r.read().decode()
    # ... and the coordinator's own endpoint: the tenants' Encode calls, all from round 1.
    query = 'sum by (tenant) (pema_coordinator_requests_total{method="Encode",' + selector[1:] + ")"
    encodes = wait_for(
        lambda: len(r := promql(services.metrics.prometheus, query)) == 2 and r,
        "coordinator metrics in Prometheus",
        timeout=60,
    )
    assert {s["metric"]["tenant"] for s in encodes} == set(tenants)


def post(url: str, context: ssl.SSLContext) -> int:
    """The HTTP status of an empty POST (a Control API call without credentials)."""
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


def test_trust_boundaries_and_a_tenant_killed_mid_round(services: Services) -> None:
    """One federation, several boundaries:
    - a SuperNode whose key the operator never registered is refused by the SuperLink;
    - the Fleet port does not serve the Control API (the port tenants reach cannot submit runs);
    - tenant A's node config claims group "kjv", which the operator did not assign: logged, and
      its adapter is not averaged (it resumes its own checkpoint);
    - tenant C fails every round (its data path does not exist): its rows keep its tenant id and
      its error reply names a phase and an exception class, never the path;
    - tenant B's SuperNode is killed while it trains in round 2 and comes back: A's round
      completes without it, and B's next round resumes from its own round-1 checkpoint."""
    run_dir = services.workdir / "fault"
    a, b = services.tenants["none"]  # fresh adapter folders below, same registered tenants
    c = services.tenants["fedavg"][0]
    procs = Processes(run_dir / "logs")
    fed = Federation(procs, run_dir)
    secret = f"private-{uuid.uuid4().hex[:8]}"
    configs = {
        t: node_config(
            services,
            run_dir,
            t,
            write_pairs(run_dir / f"train-{t}.tsv", read_pairs(KJV / "train.tsv", 16)),
            redis=False,
        )
        for t in (a, b, c)
    }
    configs[a]["aggregation-group"] = "kjv"
    configs[c]["train"] = run_dir / secret / "train.tsv"
    context = ssl.create_default_context(cafile=str(fed.ca))
    try:
        stranger = fed.start_node("stranger", {**configs[b], "tenant-id": "stranger"})
        assert stranger.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in (procs.logs / "supernode-stranger.log").read_text()
        control = "/v1/control/list-runs"
        assert post(f"https://127.0.0.1:{fed.fleet_port}{control}", context) == 404
        assert post(f"https://127.0.0.1:{fed.port}{control}", context) != 404
        # The operator assigns no group to anyone: A's claim must not make it a member.
        nodes = {t: fed.add_node(t, cfg, group="") for t, cfg in configs.items()}
    except BaseException:
        procs.stop_all()
        raise
    events: list[str] = []

    def inject(line: str) -> None:
        if "[ROUND 2/3]" in line and not events:
            # B's ClientApp is starting its round-2 training now: crash B, then bring it back.
            threading.Timer(3.0, crash_and_restart).start()
            events.append("scheduled")

    def crash_and_restart() -> None:
        procs.crash(nodes[b])
        events.append("crashed")
        fed.add_node(f"{b}-restarted", configs[b], group="")

    try:
        table = fed.run(
            {
                "num-server-rounds": 3,
                "aggregation": "fedavg",
                # In the clear, so that A's adapter does reach the server and must be ignored.
                "secure-aggregation": False,
                "eval-sample-size": 1,
                "min-nodes": 1,  # a round must not wait for a tenant that died
                "round-timeout": 240.0,
                "audit-log": str(run_dir / "audit.jsonl"),
            },
            timeout=1200,
            on_line=inject,
        )
    finally:
        procs.stop_all()
    print(table.read_text())
    assert events == ["scheduled", "crashed"]
    rows = read_rows(table)
    done = {(r["round"], r["tenant"]) for r in rows if "error" not in r}
    assert {(1, a), (2, a), (3, a), (1, b), (3, b)} <= done
    # B's one failure is its round-2 training; its restarted node, which trained nothing in
    # round 2, is not asked to evaluate an adapter it does not have.
    failed = [(r["round"], r["error"]) for r in rows if "error" in r and r["tenant"] == b]
    assert len(failed) == 1 and failed[0][0] == 2 and failed[0][1].startswith("train: "), failed
    b_round3 = next(r for r in rows if r["round"] == 3 and r["tenant"] == b)
    assert b_round3["started-from"] == "checkpoint"
    # C failed every round under its own name, with a code and a class only.
    c_rows = [r for r in rows if r["tenant"] == c]
    assert [r["round"] for r in c_rows] == [1, 2, 3]
    assert {r["error"] for r in c_rows} == {"train: train-failed:DataError"}
    # A's claim was logged and ignored: its adapter reached the server but was never averaged.
    a_rows = [r for r in rows if r["tenant"] == a]
    assert all(r["claimed-group"] == "kjv" and r["group"] == "" for r in a_rows)
    assert all(r["arrays-sent"] > 0 for r in a_rows)
    assert {r["started-from"] for r in a_rows if r["round"] > 1} == {"checkpoint"}
    server_log = run_dir / "flwr-rounds.log"
    assert (
        f"{a} claims group 'kjv' but is assigned '(private)': claim ignored"
        in server_log.read_text()
    )
    private = [secret, *private_texts(run_dir / "adapters" / f"{a}.samples.jsonl")]
    assert_only_allowed(run_dir / "audit.jsonl", "fedavg", private)
    assert_absent(private, table, table.with_suffix(".jsonl"), server_log)


def test_rounds_through_a_worker_keep_the_head_and_memories_warm(services: Services) -> None:
    """Tenant W's steps run in its worker (`worker-socket`): round 1 loads the model's head and
    tokenizer and both memories into it, round 2 finds them all warm. Tenant D names a
    worker that is not running: each of its rounds fails at once with a clear error row, and
    the run does not wait for it."""
    run_dir = services.workdir / "worker"
    w, d = services.tenants["fedavg"][1], services.tenants["none"][0]
    procs = Processes(run_dir / "logs")
    try:
        fed = Federation(procs, run_dir)
        sock = start_worker(procs, w, run_dir / "workers" / f"{w}.sock")
        for tenant, link in (
            (w, {"worker-socket": sock}),
            (d, {"worker-socket": run_dir / "workers" / "down.sock", "worker-connect-seconds": 1}),
        ):
            train = write_pairs(run_dir / "train.tsv", read_pairs(KJV / "train.tsv", 16))
            fed.add_node(tenant, node_config(services, run_dir, tenant, train, link))
        started = time.monotonic()
        table = fed.run(
            {
                "num-server-rounds": 2,
                "eval-sample-size": 1,
                "audit-log": str(run_dir / "audit.jsonl"),
            },
            timeout=900,
        )
    finally:
        procs.stop_all()
    print(table.read_text(), f"{time.monotonic() - started:.0f} s")
    rows = read_rows(table)
    worked = sorted((r for r in rows if r["tenant"] == w), key=lambda r: r["round"])
    assert [r["round"] for r in worked] == [1, 2] and not [r for r in worked if "error" in r]
    # Round 1: the head and tokenizer, and the train and valid memories; then nothing.
    assert [r["state-loads"] for r in worked] == [3, 0]
    assert [r["eval-state-loads"] for r in worked] == [0, 0]
    assert [r["cache-hit"] for r in worked] == [0, 1]
    assert [r["started-from"] for r in worked] == ["init", "checkpoint"]
    # Private (no aggregation): not one adapter array reached the ServerApp.
    assert all(r["arrays-sent"] == 0 for r in worked)
    assert all(r["train-wall-seconds"] >= r["round-seconds"] >= r["train-seconds"] for r in worked)
    down = sorted((r for r in rows if r["tenant"] == d), key=lambda r: r["round"])
    assert [(r["round"], r["error"]) for r in down] == [
        (n, "train: train-failed:WorkerUnavailable") for n in (1, 2)
    ]
    assert_only_allowed(run_dir / "audit.jsonl", "none", [str(run_dir)])


def test_secure_aggregation_sums_a_group_without_showing_a_member(services: Services) -> None:
    """fedavg under SecAgg+ (the default), with the apps instrumented (secagg_probe.py):
    - A, B and C are in group kjv; C tampers with its masked-vector reply (a stray text field):
      the server rejects that reply, the protocol counts C as dropped out and removes its masks,
      and round 1's average is A's and B's;
    - in round 2 B tampers too: one member left is below the threshold, the protocol halts, and
      every kjv member keeps the adapter it trained in round 2;
    - D is alone in group solo: SecAgg+ needs two members, so D is not averaged and its adapter
      never leaves it;
    - every value that reached server code is recorded: no adapter array, only keys, shares and
      masked integer vectors; the average the server sends back equals the mean of A's and B's
      freshly trained adapters (the probe's tenant-side copies) to quantization tolerance."""
    run_dir = services.workdir / "secure"
    a, b, c, d = services.tenants["secure"]
    groups = {a: "kjv", b: "kjv", c: "kjv", d: "solo"}
    app = probe_app(Path(__file__).resolve().parents[2], run_dir / "app")
    procs = Processes(run_dir / "logs")
    try:
        fed = Federation(procs, run_dir)
        for i, tenant in enumerate(groups):
            group = {"aggregation-group": groups[tenant]}
            train = spread_slice(run_dir, i)
            fed.add_node(tenant, node_config(services, run_dir, tenant, train, group))
        (run_dir / "adapters").mkdir(parents=True, exist_ok=True)
        (run_dir / "adapters" / f"{c}.tamper").touch()

        def b_tampers_in_round_2(line: str) -> None:
            # Round 2's training has just been sent out; its masked vectors come a stage later.
            if "[ROUND 2/2]" in line:
                (run_dir / "adapters" / f"{b}.tamper").touch()

        table = fed.run(
            {
                "num-server-rounds": ROUNDS,
                "aggregation": "fedavg",
                "eval-sample-size": 1,
                "min-nodes": 4,
                "audit-log": str(run_dir / "audit.jsonl"),
            },
            timeout=1200,
            on_line=b_tampers_in_round_2,
            app=app,
        )
    finally:
        procs.stop_all()
    print(table.read_text())
    rows = read_rows(table)
    assert sorted((r["round"], r["tenant"]) for r in rows) == sorted(
        (rnd, t) for rnd in range(1, ROUNDS + 1) for t in groups
    )
    for r in rows:
        assert "error" not in r, r
        # No train reply carried an adapter: under SecAgg+ they leave only masked.
        assert r["arrays-sent"] == 0, r
        if r["group"] == "kjv":
            assert r["averaged"] == (2 if r["round"] == 1 else 0) and r["secagg-seconds"] > 0, r
            assert r["started-from"] == ("init" if r["round"] == 1 else "group"), r
        else:
            assert r["averaged"] == 0, r
            assert r["started-from"] == ("init" if r["round"] == 1 else "checkpoint"), r
        assert r["round-wall-seconds"] >= r["train-wall-seconds"], r
    log = (run_dir / "flwr-rounds.log").read_text()
    assert "group 'solo' has 1 member(s) that trained; SecAgg+ needs 2: not averaged" in log
    assert "reply not on the allow-list" in log and "counted as a dropout" in log
    assert "round 2: SecAgg+ halted for group 'kjv'" in log
    assert_only_allowed(run_dir / "audit.jsonl", "fedavg", [])

    tenant_of = {r["node"]: r["tenant"] for r in rows}
    record = read_record(run_dir / "audit.probe.pkl")
    received = [e for e in record if e["dir"] == "in"]
    sent = [e for e in record if e["dir"] == "out"]
    # The protocol ran with the group's members only, D never got a SecAgg+ message.
    assert {tenant_of[e["node"]] for e in sent if e["stage"]} == {a, b, c}
    assert {e["stage"] for e in received if e["stage"]} == set(SECAGG_REPLIES)

    order = adapter_names()
    own = {
        (t, rnd): load_file(str(run_dir / "adapters" / f"{t}.round{rnd}.safetensors"))
        for t in groups
        for rnd in range(1, ROUNDS + 1)
    }
    # (b) Nothing that reached server code holds an adapter: no array at all, no float vector,
    # not even the bytes of one of a member's tensors.
    blobs: list[bytes] = []
    for e in received:
        for name, fields in e["records"].items():
            for key, value in fields.items():
                assert not isinstance(value, np.ndarray | Array), (e["stage"], name, key)
                items = value if isinstance(value, list) else [value]
                blobs += [v for v in items if isinstance(v, bytes)]
        masked = e["records"].get(SECAGG, {}).get(Key.MASKED_PARAMETERS)
        if masked is not None:
            assert all(np.load(io.BytesIO(v)).dtype.kind in "iu" for v in masked)
    assert blobs
    tensors = [t.numpy().tobytes() for state in own.values() for t in state.values() if t.any()]
    assert tensors and not any(t in blob for t in tensors for blob in blobs)

    # (a) What the server averaged in round 1, as it sends it back to every kjv member (evaluate),
    # is the mean of A's and B's adapters (equal weights: 24 pairs each), C's left out.
    evaluate = [e for e in sent if e["type"] == "evaluate" and ARRAYS in e["records"]]
    assert {(round_of(e), tenant_of[e["node"]]) for e in evaluate} == {(1, a), (1, b), (1, c)}
    average = list(evaluate[0]["records"][ARRAYS].values())
    assert len(average) == len(order)
    off_c = 0.0  # how far the average is from one that would include C
    for name, got in zip(order, average, strict=True):
        mean = (own[(a, 1)][name] + own[(b, 1)][name]).numpy() / 2
        assert np.allclose(got, mean, rtol=0, atol=1e-5), name
        with_c = (2 * mean + own[(c, 1)][name].numpy()) / 3
        off_c = max(off_c, float(np.abs(got - with_c).max()))
    assert off_c > 1e-4
    # Round 2 was not averaged: every tenant ends on the adapter it trained in round 2.
    for t in groups:
        final = weights(run_dir / "adapters" / t)
        assert all(torch.equal(final[k], own[(t, ROUNDS)][k]) for k in final), t


def round_of(entry: dict) -> int:
    return int(entry["records"]["config"]["server-round"])
