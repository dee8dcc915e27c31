"""Round cost: a federated round against the same training in-process, and the memory build cold
against from the Redis cache.

One tenant trains on the first N kjv_web training pairs. Real processes: the coordinator serving
the default model, a SuperLink, one SuperNode, `flwr run`, Redis on 127.0.0.1:6379.

1. cold: a tenant id never seen before, so round 1 builds its memories through the coordinator's
   Encode; rounds 2..R continue from the tenant's checkpoint (phase 2) with memories from Redis.
2. cached: the same tenant from scratch (its adapter folder deleted): round 1 reads the memories
   from Redis, then trains exactly as round 1 of the cold run did.
3. in-process: this process loads the model and runs the same `train_job` (same pairs, settings,
   seed and Redis memories): phases 1+2 from init, then phase 2 from its own state R-1 times.

The federated round's time is the server's: from sending the train message to holding the reply
(`train-wall-seconds`: ClientApp start-up, the head download, transfers, scheduling, training).
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
from pathlib import Path
from typing import Any

import redis
import torch

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
    write_pairs,
)
from tenant.flower_client import adapter_config
from tenant.jobs import train_job
from tenant.redis_store import open_memory_store

DATA = shared_data_dir() / "kjv_web"
RESULTS = Path(__file__).resolve().parent / "results"


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
    """The cold and the cached `flwr run` of one tenant; their round rows."""
    token = uuid.uuid4().hex
    procs = Processes(workdir / "logs")
    adapter_dir = workdir / "adapters" / tenant
    try:
        coordinator, _ = start_coordinator(procs, None, {tenant: token}, workdir)
        fed = Federation(procs, workdir)
        train = write_pairs(workdir / "train.tsv", read_pairs(DATA / "train.tsv", args.pairs))
        fed.add_node(tenant, node_config(args, workdir, tenant, token, coordinator, train))
        run_config = {
            "num-server-rounds": args.rounds,
            "local-epochs": args.epochs,
            "eval-sample-size": 2,
            "min-nodes": 1,
        }
        rows = {}
        for name in ("cold", "cached"):
            shutil.rmtree(adapter_dir, ignore_errors=True)
            print(f"federated run ({name}) ...", file=sys.stderr, flush=True)
            table = fed.run(run_config, timeout=args.timeout, name=name)
            rows[name] = [r for r in read_rows(table) if r.get("tenant") == tenant]
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

    cold_build = by_round(fed["cold"], "memory-build-seconds")
    cached_build = by_round(fed["cached"], "memory-build-seconds")
    later_fed = (
        by_round(fed["cold"], "train-wall-seconds")[1:]
        + by_round(fed["cached"], "train-wall-seconds")[1:]
    )
    later_local = [r["wall"] for r in local[1:]]
    first_fed = by_round(fed["cached"], "train-wall-seconds")[0]
    return {
        "memory_build_cold_s": cold_build[0],
        "memory_build_cached_s": cached_build[0],
        "cached_over_cold": cached_build[0] / cold_build[0],
        "cold_round1_wall_s": by_round(fed["cold"], "train-wall-seconds")[0],
        "cached_round1_wall_s": first_fed,
        "in_process_round1_wall_s": local[0]["wall"],
        "round1_fed_over_local": first_fed / local[0]["wall"],
        "later_rounds_fed_wall_s": later_fed,
        "later_rounds_local_wall_s": later_local,
        "later_median_fed_s": statistics.median(later_fed),
        "later_median_local_s": statistics.median(later_local),
        "later_fed_over_local": statistics.median(later_fed) / statistics.median(later_local),
        "later_overhead_s": statistics.median(later_fed) - statistics.median(later_local),
    }


def write_report(doc: dict[str, Any]) -> None:
    s, a = doc["summary"], doc["args"]
    lines = [
        "# Round cost",
        "",
        f"One tenant, first {a['pairs']} kjv_web training pairs ({doc['train_keys']} keys), "
        f"{a['valid_pairs']} valid pairs, {a['rounds']} rounds of {a['epochs']} local epoch(s), "
        f"{a['threads']} torch thread(s) for training; {doc['machine']}. Produced by "
        f"`python -m benchmarks.rounds --pairs {a['pairs']} --rounds {a['rounds']}`.",
        "",
        "| measure | federated | in-process | ratio |",
        "|---|---:|---:|---:|",
        f"| round 1 (phases 1+2, memory from Redis), wall s | {s['cached_round1_wall_s']:.1f} "
        f"| {s['in_process_round1_wall_s']:.1f} | {s['round1_fed_over_local']:.2f} |",
        f"| later rounds (phase 2 from the checkpoint), median wall s "
        f"| {s['later_median_fed_s']:.1f} | {s['later_median_local_s']:.1f} "
        f"| {s['later_fed_over_local']:.2f} |",
        "",
        "| memory build (train + valid), round 1 | seconds |",
        "|---|---:|",
        f"| cold: Encode through the coordinator | {s['memory_build_cold_s']:.2f} |",
        f"| cached: from Redis | {s['memory_build_cached_s']:.2f} |",
        f"| cached / cold | {100 * s['cached_over_cold']:.2f}% (target < 5%) |",
        "",
        f"Cold round 1 as a whole (build + train, server's view): {s['cold_round1_wall_s']:.1f} s. "
        f"Later rounds, every sample (federated / in-process): "
        f"{', '.join(f'{x:.1f}' for x in s['later_rounds_fed_wall_s'])} / "
        f"{', '.join(f'{x:.1f}' for x in s['later_rounds_local_wall_s'])} s; the federated "
        f"overhead per round is {s['later_overhead_s']:.1f} s (median).",
        "",
    ]
    (RESULTS / "rounds.md").write_text("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rounds", description=__doc__)
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--valid-pairs", type=int, default=40)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args()
    if args.rounds < 2:
        p.error("--rounds must be at least 2 (later rounds are compared too)")
    if not redis_up():
        print(f"Redis is not answering at {REDIS_URL}", file=sys.stderr)
        return 2
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    default_model_dir()
    tenant = f"bench-rounds-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(REDIS_URL)
    with tempfile.TemporaryDirectory(prefix="pema-rounds-") as tmp:
        workdir = Path(tmp)
        try:
            fed = federated(args, workdir, tenant)
            print("in-process ...", file=sys.stderr, flush=True)
            local = in_process(args, workdir, tenant)
        finally:
            keys = list(client.scan_iter(match=f"pema:{tenant}:*"))
            if keys:
                client.delete(*keys)
    doc = {
        "args": vars(args),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "train_keys": int(fed["cold"][0]["train-keys"]),
        "federated": fed,
        "in_process": local,
        "summary": summarize(fed, local),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rounds.json").write_text(json.dumps(doc, indent=2) + "\n")
    write_report(doc)
    print((RESULTS / "rounds.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
