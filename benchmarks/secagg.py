"""Secure aggregation's round cost: one fedavg group of two tenants, the same rounds averaged in
the clear and under SecAgg+, in one federation.

Real processes, as in benchmarks/rounds.py: the coordinator serving the default model, a
SuperLink, two SuperNodes in group "kjv" (Genesis and Exodus, N pairs each), `flwr run`, Redis.
A one-round warm-up builds both tenants' memories into Redis (not measured); then `flwr run`
alternates between `secure-aggregation=false` and `=true`, each run from fresh adapters, so that
both settings meet the same load. A round's time is the server's `round-wall-seconds` (sending
the train messages to holding the evaluate replies: training, any SecAgg+ stages, evaluation);
`secagg-seconds` is the protocol alone (its four stages, one ClientApp process per tenant each).

Run: `python -m benchmarks.secagg [--pairs 100] [--rounds 3] [--repeats 2]`; writes
benchmarks/results/secagg.md and secagg.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import uuid
from pathlib import Path
from typing import Any

from benchmarks.rounds import DATA, RESULTS, machine, node_config, publish, with_fresh_tenants
from pema.argtypes import new_parser, positive_float, positive_int
from tenant.demo import (
    Federation,
    Processes,
    book_slice,
    read_rows,
    start_coordinator,
    write_pairs,
)

BOOKS = ("Genesis", "Exodus")
SETTINGS = {"clear": False, "secagg": True}


def measure(args: argparse.Namespace, workdir: Path, tenants: list[str]) -> dict[str, list[dict]]:
    """Round rows of every measured run, by setting (runs of one setting in order)."""
    tokens = {t: uuid.uuid4().hex for t in tenants}
    procs = Processes(workdir / "logs")
    try:
        # The coordinator gets every core, as in the demo: tenants mostly wait on its forwards.
        coordinator, _ = start_coordinator(
            procs, None, tokens, workdir, threads=os.cpu_count() or 1
        )
        fed = Federation(procs, workdir)
        for tenant, book in zip(tenants, BOOKS, strict=True):
            pairs = book_slice(DATA / "train.tsv", book, args.pairs)
            train = write_pairs(workdir / f"train-{tenant}.tsv", pairs)
            node = node_config(args, workdir, tenant, tokens[tenant], coordinator, train)
            fed.add_node(tenant, {**node, "aggregation-group": "kjv"})
        run_config = {
            "aggregation": "fedavg",
            "local-epochs": args.epochs,
            "eval-sample-size": 2,
            "min-nodes": len(tenants),
        }
        print("warm-up (memories into Redis) ...", file=sys.stderr, flush=True)
        fed.run({**run_config, "num-server-rounds": 1}, timeout=args.timeout, name="warm-up")
        rows: dict[str, list[dict]] = {name: [] for name in SETTINGS}
        for rep in range(args.repeats):
            # Alternate which setting goes first: load drifts on a shared machine.
            order = list(SETTINGS) if rep % 2 == 0 else list(reversed(SETTINGS))
            for name in order:
                shutil.rmtree(workdir / "adapters", ignore_errors=True)
                print(f"{name} run {rep + 1} ...", file=sys.stderr, flush=True)
                table = fed.run(
                    {
                        **run_config,
                        "num-server-rounds": args.rounds,
                        "secure-aggregation": SETTINGS[name],
                    },
                    timeout=args.timeout,
                    name=f"{name}-{rep + 1}",
                )
                rows[name] += [{**r, "repeat": rep + 1} for r in read_rows(table)]
        return rows
    finally:
        procs.stop_all()


def per_round(rows: list[dict], key: str) -> list[float]:
    """One value per (repeat, round): the key is the same for every tenant of a round."""
    seen = {(r["repeat"], r["round"]): float(r[key]) for r in rows if key in r}
    return [seen[k] for k in sorted(seen)]


def summarize(rows: dict[str, list[dict]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, got in rows.items():
        errors = [r for r in got if "error" in r]
        if errors:
            raise RuntimeError(f"{name}: failed rows {errors}")
        wall = per_round(got, "round-wall-seconds")
        out[name] = {
            "round_wall_s": wall,
            "round_wall_median_s": statistics.median(wall),
            "train_wall_median_s": statistics.median(per_round(got, "train-wall-seconds")),
            "averaged": sorted({int(r["averaged"]) for r in got}),
        }
    # The average is the same up to quantization: so should be what the tenants then measure.
    for key in ("valid-loss", "bleu"):
        out[key] = {
            name: sorted({round(float(r[key]), 3) for r in got}) for name, got in rows.items()
        }
    secagg = per_round(rows["secagg"], "secagg-seconds")
    out["secagg"]["secagg_s"] = secagg
    out["secagg"]["secagg_median_s"] = statistics.median(secagg)
    added = out["secagg"]["round_wall_median_s"] - out["clear"]["round_wall_median_s"]
    out["added_median_s"] = added
    out["added_fraction"] = added / out["clear"]["round_wall_median_s"]
    return out


def write_report(doc: dict[str, Any]) -> None:
    s, a = doc["summary"], doc["args"]
    clear, secure = s["clear"], s["secagg"]
    lines = [
        "# Secure aggregation: round cost",
        "",
        f"One fedavg group of two tenants (kjv_web, {a['pairs']} pairs of {' and '.join(BOOKS)} "
        f"each, {a['valid_pairs']} valid pairs), {a['rounds']} rounds of {a['epochs']} local "
        f"epoch(s) per run, {a['repeats']} run(s) per setting alternating, {a['threads']} torch "
        f"thread(s); {doc['machine']}. Produced by `python -m benchmarks.secagg --pairs "
        f"{a['pairs']} --rounds {a['rounds']} --repeats {a['repeats']}`.",
        "",
        f"**Machine**: {doc['load']}" + (f" {a['conditions']}" if a.get("conditions") else ""),
        "",
        "| setting | round wall s (median) | train wall s (median) | SecAgg+ s (median) "
        "| adapters averaged |",
        "|---|---:|---:|---:|---|",
        f"| in the clear (`secure-aggregation = false`) | {clear['round_wall_median_s']:.1f} "
        f"| {clear['train_wall_median_s']:.1f} | | {clear['averaged']} |",
        f"| SecAgg+ (default) | {secure['round_wall_median_s']:.1f} "
        f"| {secure['train_wall_median_s']:.1f} | {secure['secagg_median_s']:.1f} "
        f"| {secure['averaged']} |",
        "",
        f"SecAgg+ adds {s['added_median_s']:.1f} s to the median round "
        f"({100 * s['added_fraction']:+.0f}%); its four protocol stages took "
        f"{secure['secagg_median_s']:.1f} s (median). Every round, in run order "
        f"(clear / SecAgg+): {', '.join(f'{x:.1f}' for x in clear['round_wall_s'])} / "
        f"{', '.join(f'{x:.1f}' for x in secure['round_wall_s'])} s.",
        "",
        f"What the tenants measured on the group's average, every round and run (clear / "
        f"SecAgg+): valid loss {s['valid-loss']['clear']} / {s['valid-loss']['secagg']}, BLEU "
        f"{s['bleu']['clear']} / {s['bleu']['secagg']}.",
        "",
    ]
    (RESULTS / "secagg.md").write_text("\n".join(lines))


def load_note(start: tuple[float, ...], end: tuple[float, ...]) -> str:
    cores = os.cpu_count() or 1
    busy = max(start[0], end[0]) > 0.5 * cores
    return (
        f"{cores} CPU cores; 1-minute load average {start[0]:.1f} at the start and {end[0]:.1f} "
        f"at the end"
        + (
            ": other work shared the cores during the run, so absolute times are inflated; both "
            "settings ran alternately under the same load."
            if busy
            else "."
        )
    )


def main() -> int:
    p = new_parser("python -m benchmarks.secagg", __doc__)
    p.add_argument("--pairs", type=positive_int, default=100, help="training pairs per tenant")
    p.add_argument("--valid-pairs", type=positive_int, default=24, help="validation pairs")
    p.add_argument("--rounds", type=positive_int, default=3, help="rounds per run")
    p.add_argument(
        "--repeats", type=positive_int, default=2, help="runs of each setting, alternated"
    )
    p.add_argument("--epochs", type=positive_int, default=1, help="local epochs per round")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per tenant")
    p.add_argument("--timeout", type=positive_float, default=1800, help="seconds per run")
    p.add_argument(
        "--conditions",
        default="a quiet machine",
        help="how the machine was shared while this ran, for the report",
    )
    args = p.parse_args()
    run = uuid.uuid4().hex[:8]
    tenants = [f"bench-secagg-{run}-{i}" for i in range(len(BOOKS))]
    start = os.getloadavg()
    rows = with_fresh_tenants(
        tenants, "pema-secagg-", lambda workdir: measure(args, workdir, tenants)
    )
    doc = {
        "args": vars(args),
        "machine": machine(),
        "load": load_note(start, os.getloadavg()),
        "rows": rows,
        "summary": summarize(rows),
    }
    publish("secagg", doc, write_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
