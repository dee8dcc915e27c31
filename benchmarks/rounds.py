"""Round cost: a federated round against the same training in-process, with and without the
tenant's worker, and the memory build cold against from the Redis cache.

One tenant trains on the first N kjv_web training pairs. Real processes: the coordinator serving
the default model, a SuperLink, one SuperNode, `flwr run`, Redis on 127.0.0.1:6379; each
federated run gets its own SuperLink and SuperNode.

1. cold: a tenant id never seen before, so round 1 builds its memories through the coordinator's
   Encode; rounds 2..R continue from the tenant's checkpoint (phase 2) with memories from Redis.
   Every step runs in the ClientApp's own process (a fresh one per message).
2. cached: the same tenant from scratch (its adapter folder deleted): round 1 reads the memories
   from Redis, then trains exactly as round 1 of the cold run did.
3. worker: as cached, with the steps in the tenant's worker (`pema-tenant worker`, node config
   `worker-socket`), started fresh: round 1 loads the head and memories into it, later rounds
   find them warm.
4. in-process: this process loads the model and runs the same `train_job` (same pairs, settings,
   seed and Redis memories): phases 1+2 from init, then phase 2 from its own state R-1 times.

The federated round's time is the server's: from sending the train message to holding the reply
(`train-wall-seconds`: ClientApp start-up, loading, transfers, scheduling, training).
Run: `python -m benchmarks.rounds [--pairs 200] [--rounds 4]`; writes benchmarks/results/rounds.md
and rounds.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import redis
import torch

from pema.argtypes import positive_float, positive_int
from pema.data import read_pairs, shared_data_dir
from pema.models import default_model_dir
from pema.prompts import TASK_TEMPLATES
from pema.training import TrainConfig
from tenant.backend import local_backend
from tenant.demo import (
    REDIS_URL,
    Federation,
    Processes,
    read_rows,
    redis_up,
    start_coordinator,
    start_worker,
    write_pairs,
)
from tenant.jobs import train_job
from tenant.redis_store import open_memory_store
from tenant.steps import adapter_config

DATA = shared_data_dir() / "kjv_web"
RESULTS = Path(__file__).resolve().parent / "results"
RUNS = (("cold", False), ("cached", False), ("worker", True))  # (name, steps in a worker)
T = TypeVar("T")


def with_fresh_tenants(tenants: list[str], prefix: str, measure: Callable[[Path], T]) -> T:
    """`measure(workdir)` in a temporary folder, with Redis answering and the default model
    provisioned; the tenants' Redis entries are deleted afterwards, whatever happened."""
    if not redis_up():
        print(f"Redis is not answering at {REDIS_URL}", file=sys.stderr)
        raise SystemExit(2)
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    default_model_dir()
    client = redis.Redis.from_url(REDIS_URL)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        try:
            return measure(Path(tmp))
        finally:
            for t in tenants:
                keys = list(client.scan_iter(match=f"pema:{t}:*"))
                if keys:
                    client.delete(*keys)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def publish(name: str, doc: dict[str, Any], write_report: Callable[[dict[str, Any]], None]) -> None:
    """Writes results/<name>.json and (through `write_report`) <name>.md, and prints the latter."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    write_report(doc)
    print((RESULTS / f"{name}.md").read_text())


def node_config(
    args: argparse.Namespace, workdir: Path, tenant: str, token: str, coordinator: str, train: Path
) -> dict[str, Any]:
    """A benchmark tenant's SuperNode: kjv_web's template, memories only from Redis (a silent
    fallback to disk would change what is measured), `args.threads` torch threads."""
    return {
        "tenant-id": tenant,
        "token": token,
        "coordinator": coordinator,
        "train": train,
        "valid": DATA / "valid.tsv",
        "test": DATA / "test.tsv",
        "max-valid-pairs": args.valid_pairs,
        "template": TASK_TEMPLATES["kjv_web"].replace("\n", "\\n"),
        "adapter-dir": workdir / "adapters" / tenant,
        "cache-dir": workdir / "memories",
        "redis-url": REDIS_URL,
        "cache-fallback": "fail",
        "threads": args.threads,
    }


def federated(args: argparse.Namespace, workdir: Path, tenant: str) -> dict[str, list[dict]]:
    """The cold, cached and worker `flwr run` of one tenant; their round rows."""
    token = uuid.uuid4().hex
    procs = Processes(workdir / "logs")
    adapter_dir = workdir / "adapters" / tenant
    try:
        coordinator, _ = start_coordinator(procs, None, {tenant: token}, workdir)
        train = write_pairs(workdir / "train.tsv", read_pairs(DATA / "train.tsv", args.pairs))
        node = node_config(args, workdir, tenant, token, coordinator, train)
        run_config = {
            "num-server-rounds": args.rounds,
            "local-epochs": args.epochs,
            "eval-sample-size": 2,
            "min-nodes": 1,
        }
        rows = {}
        for name, worker in RUNS:
            # Its own SuperLink, SuperNode (and worker), stopped before the next run starts.
            run_procs = Processes(workdir / name / "logs")
            try:
                fed = Federation(run_procs, workdir / name)
                sock = workdir / "workers" / "tenant.sock"
                extra = {"worker-socket": start_worker(run_procs, name, sock)} if worker else {}
                fed.add_node(tenant, {**node, **extra})
                shutil.rmtree(adapter_dir, ignore_errors=True)
                print(f"federated run ({name}) ...", file=sys.stderr, flush=True)
                table = fed.run(run_config, timeout=args.timeout, name=name)
                rows[name] = [r for r in read_rows(table) if r.get("tenant") == tenant]
            finally:
                run_procs.stop_all()
        return rows
    finally:
        procs.stop_all()


def in_process(args: argparse.Namespace, workdir: Path, tenant: str) -> list[dict[str, float]]:
    """The same training without Flower or the coordinator: wall seconds of each 'round'."""
    torch.set_num_threads(args.threads)
    backend = local_backend()
    train_pairs = read_pairs(workdir / "train.tsv")
    valid_pairs = read_pairs(DATA / "valid.tsv", args.valid_pairs)
    config = adapter_config(TASK_TEMPLATES["kjv_web"])
    store = open_memory_store(REDIS_URL, workdir / "memories", "fail")
    cfg = TrainConfig(epochs=args.epochs)
    state = None
    out = []
    for rnd in range(1, args.rounds + 1):
        start = time.perf_counter()
        outcome = train_job(
            backend, train_pairs, valid_pairs, config, cfg, None, store, tenant,
            quiet=True, start_state=state, phases=(1, 2) if state is None else (2,),
        )  # fmt: skip
        state = outcome.adapter.state_dict()
        out.append(
            {
                "round": rnd,
                "wall": time.perf_counter() - start,
                "train": outcome.report.seconds,
                "memory": float(outcome.summary["memory_build_seconds"]),
                "cache_hit": bool(outcome.summary["memory_cache_hit"]),
            }
        )
    return out


def summarize(fed: dict[str, list[dict]], local: list[dict[str, float]]) -> dict[str, Any]:
    def by_round(rows: list[dict], key: str) -> list[float]:
        return [float(r[key]) for r in sorted(rows, key=lambda r: r["round"])]

    wall = {name: by_round(fed[name], "train-wall-seconds") for name, _ in RUNS}
    later = {
        "process": wall["cold"][1:] + wall["cached"][1:],  # a ClientApp process per message
        "worker": wall["worker"][1:],
        "local": [r["wall"] for r in local[1:]],
    }
    median = {k: statistics.median(v) for k, v in later.items()}
    cold_build = by_round(fed["cold"], "memory-build-seconds")[0]
    cached_build = by_round(fed["cached"], "memory-build-seconds")[0]
    return {
        "memory_build_cold_s": cold_build,
        "memory_build_cached_s": cached_build,
        "cached_over_cold": cached_build / cold_build,
        "cold_round1_wall_s": wall["cold"][0],
        "round1_wall_s": {"process": wall["cached"][0], "worker": wall["worker"][0]},
        "in_process_round1_wall_s": local[0]["wall"],
        "round1_over_local": {
            "process": wall["cached"][0] / local[0]["wall"],
            "worker": wall["worker"][0] / local[0]["wall"],
        },
        "later_rounds_wall_s": later,
        "later_median_s": median,
        "later_over_local": {
            "process": median["process"] / median["local"],
            "worker": median["worker"] / median["local"],
        },
        "later_overhead_s": {
            "process": median["process"] - median["local"],
            "worker": median["worker"] - median["local"],
        },
        # What each train step loaded (head and tokenizer, memories), round by round.
        "worker_state_loads": [int(x) for x in by_round(fed["worker"], "state-loads")],
        "process_state_loads": [int(x) for x in by_round(fed["cached"], "state-loads")],
    }


def write_report(doc: dict[str, Any]) -> None:
    s, a = doc["summary"], doc["args"]
    r1, later, ratio1, ratio = (
        s["round1_wall_s"], s["later_median_s"], s["round1_over_local"], s["later_over_local"]
    )  # fmt: skip

    def samples(key: str) -> str:
        return ", ".join(f"{x:.1f}" for x in s["later_rounds_wall_s"][key])

    lines = [
        "# Round cost",
        "",
        f"One tenant, first {a['pairs']} kjv_web training pairs ({doc['train_keys']} keys), "
        f"{a['valid_pairs']} valid pairs, {a['rounds']} rounds of {a['epochs']} local epoch(s), "
        f"{a['threads']} torch thread(s) for training; {doc['machine']}. Produced by "
        f"`python -m benchmarks.rounds --pairs {a['pairs']} --rounds {a['rounds']}`.",
        "",
        f"**Conditions:** {a['conditions']}",
        "",
        "*process*: every step in a fresh ClientApp process (Flower starts one per message); "
        "*worker*: the steps in the tenant's long-lived worker (`pema-tenant worker`); "
        "*in-process*: `train_job` in a loop, no Flower. Ratios are to in-process.",
        "",
        "| measure | process | worker | in-process | ratio process | ratio worker |",
        "|---|---:|---:|---:|---:|---:|",
        f"| round 1 (phases 1+2, memory from Redis), wall s | {r1['process']:.1f} "
        f"| {r1['worker']:.1f} | {s['in_process_round1_wall_s']:.1f} "
        f"| {ratio1['process']:.2f} | {ratio1['worker']:.2f} |",
        f"| later rounds (phase 2 from the checkpoint), median wall s | {later['process']:.1f} "
        f"| {later['worker']:.1f} | {later['local']:.1f} "
        f"| {ratio['process']:.2f} | {ratio['worker']:.2f} |",
        "",
        "| memory build (train + valid), round 1 | seconds |",
        "|---|---:|",
        f"| cold: Encode through the coordinator | {s['memory_build_cold_s']:.2f} |",
        f"| cached: from Redis | {s['memory_build_cached_s']:.2f} |",
        f"| cached / cold | {100 * s['cached_over_cold']:.2f}% (target < 5%) |",
        "",
        f"Cold round 1 as a whole (build + train, server's view): {s['cold_round1_wall_s']:.1f} s. "
        f"Later rounds, every sample: process {samples('process')} s; worker {samples('worker')} "
        f"s; in-process {samples('local')} s. Federated overhead per later round (median): "
        f"{s['later_overhead_s']['process']:.1f} s with a process per step, "
        f"{s['later_overhead_s']['worker']:.1f} s with the worker. State loaded per train step "
        f"(head and tokenizer, memories; the reply's `state-loads`), round 1 to {a['rounds']}: "
        f"process {s['process_state_loads']}, worker {s['worker_state_loads']}.",
        "",
    ]
    (RESULTS / "rounds.md").write_text("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.rounds",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pairs", type=positive_int, default=200, help="training pairs (default: 200)")
    p.add_argument(
        "--valid-pairs", type=positive_int, default=40, help="validation pairs (default: 40)"
    )
    p.add_argument("--rounds", type=positive_int, default=4, help="rounds per run (default: 4)")
    p.add_argument("--epochs", type=positive_int, default=1, help="local epochs (default: 1)")
    p.add_argument(
        "--threads", type=positive_int, default=2, help="torch threads for training (default: 2)"
    )
    p.add_argument(
        "--timeout", type=positive_float, default=1800, help="seconds per run (default: 1800)"
    )
    p.add_argument(
        "--conditions",
        default="a quiet machine",
        help="how the machine was shared while this ran, for the report (default: a quiet machine)",
    )
    args = p.parse_args()
    if args.rounds < 2:
        p.error("--rounds must be at least 2 (later rounds are compared too)")
    tenant = f"bench-rounds-{uuid.uuid4().hex[:8]}"

    def measure(workdir: Path) -> tuple[dict[str, list[dict]], list[dict[str, float]]]:
        fed = federated(args, workdir, tenant)
        print("in-process ...", file=sys.stderr, flush=True)
        return fed, in_process(args, workdir, tenant)

    fed, local = with_fresh_tenants([tenant], "pema-rounds-", measure)
    doc = {
        "args": vars(args),
        "machine": machine(),
        "train_keys": int(fed["cold"][0]["train-keys"]),
        "federated": fed,
        "in_process": local,
        "summary": summarize(fed, local),
    }
    publish("rounds", doc, write_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
