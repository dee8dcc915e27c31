"""Serving benchmark: the coordinator's Encode throughput and Decode latency against in-process.

One process hosts the real default model (in the faster forward dtype here) behind a real gRPC server on localhost; the
tenants are client threads in the same process, each with its own channel and token. The
in-process baseline runs the *same* FrozenLM object on the same items while the server is idle.

- Encode: teacher-forced keys for N kjv_web pairs, split evenly among 1, 4 and 8 concurrent
  tenants; input tokens (prompt + target) per second, median of repeats.
- Generation: greedy PEMA generation (untrained residual adapter, constant λ, so P_PEMA is
  computed every step) through Decode vs a LocalSession; seconds per generated token.
- Concurrent decode (continuous batching): 1, 4, 8 and 16 Decode sessions at once, each a client
  thread generating greedily at batch 1 (plain greedy, no adapter, so the clients' work stays
  small); aggregate generated tokens per second against one session alone, and against the
  in-process ceiling (one LocalSession holding all the rows in one batch). Batch-1 latency
  through Decode against in-process greedy comes from the same rows.

Run: `python -m benchmarks.serving [--pairs 192] [--repeats 3] [--sessions 1 4 8 16]`; writes
benchmarks/results/serving.md and serving.json. `--device cuda` runs the coordinator on a GPU
(rows for it are "not measured" until someone with a GPU runs it).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from coordinator.config import CoordinatorConfig, Tenant, TenantLimits, hash_token
from coordinator.server import CoordinatorServer, load_model
from pema.adapter import AdapterConfig, PemaAdapter
from pema.argtypes import new_parser, positive_int
from pema.backbone import EncodeItem, MemoryMode
from pema.data import read_pairs, shared_data_dir
from pema.generation import Mixing, generate
from pema.process import median_time
from pema.prompts import DEFAULT_TEMPLATE, PromptFormat
from tenant.coordinator_client import ClientConfig, CoordinatorBackbone, CoordinatorClient

DATA = shared_data_dir() / "kjv_web" / "train.tsv"
RESULTS = Path(__file__).resolve().parent / "results"
TENANT_COUNTS = (1, 4, 8)
SESSION_COUNTS = (1, 4, 8, 16)


def run_in_threads(tasks: Sequence[Callable[[], object]]) -> None:
    """Run each task in its own thread (the tenants' clients) and re-raise the first error."""
    errors: list[BaseException] = []

    def guard(task: Callable[[], object]) -> None:
        try:
            task()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=guard, args=(t,)) for t in tasks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def encode_concurrently(backbones: Sequence[CoordinatorBackbone], items: list[EncodeItem]) -> None:
    shards = [items[i :: len(backbones)] for i in range(len(backbones))]
    run_in_threads(
        [
            functools.partial(bb.encode, shard, MemoryMode.TEACHER_FORCED)
            for bb, shard in zip(backbones, shards, strict=True)
        ]
    )


def sessions_together(
    backbones: Sequence[CoordinatorBackbone], n: int, use: Callable[[int, Any], None]
) -> None:
    """Opens n Decode sessions, one per thread and stream (tenants in turn), and calls
    `use(i, session)` in all threads at once, once every session is open."""
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            session = backbones[i % len(backbones)].session()
            barrier.wait()
        except BaseException:
            barrier.abort()  # the other threads stop waiting for this one
            raise
        use(i, session)

    run_in_threads([functools.partial(run, i) for i in range(n)])


def decode_concurrently(
    backbones: Sequence[CoordinatorBackbone],
    head: Any,
    prompts: Sequence[list[int]],
    new_tokens: int,
) -> list[list[int]]:
    """One Decode session per prompt, started together; plain greedy at batch 1. Returns each
    session's tokens."""
    out: list[list[int]] = [[] for _ in prompts]

    def use(i: int, session: Any) -> None:
        (out[i],) = generate(session, head, [prompts[i]], frozenset(), [new_tokens])

    sessions_together(backbones, len(prompts), use)
    return out


def replay_concurrently(
    backbones: Sequence[CoordinatorBackbone],
    prompts: Sequence[list[int]],
    tokens: Sequence[list[int]],
) -> None:
    """The server's side of `decode_concurrently` alone: each session feeds the tokens it would
    have chosen (its solo greedy output), so no client computes logits on these shared cores."""

    def use(i: int, session: Any) -> None:
        try:
            session.start([prompts[i]])
            for t in tokens[i][:-1]:
                session.step([t])
        finally:
            session.close()

    sessions_together(backbones, len(prompts), use)


def concurrent_decode_rows(
    lm: Any,
    backbones: Sequence[CoordinatorBackbone],
    prompts: Sequence[list[int]],
    counts: Sequence[int],
    new_tokens: int,
    repeats: int,
) -> list[dict[str, Any]]:
    """Aggregate tokens/s of k concurrent sessions, vs one session and vs in-process batch k;
    also the server alone (tokens replayed). `same_tokens`: every session's tokens equal that
    prompt's greedy output generated alone in-process."""
    head = lm.head()
    solo = {
        i: generate(lm.session(), head, [prompts[i]], frozenset(), [new_tokens])[0]
        for i in range(min(len(prompts), max(counts)))
    }
    rows: list[dict[str, Any]] = []
    for k in counts:
        ps = [prompts[i % len(prompts)] for i in range(k)]
        alone = [solo[i % len(prompts)] for i in range(k)]

        def in_process(ps: list[list[int]] = ps) -> list[list[int]]:
            return generate(lm.session(), head, ps, frozenset(), [new_tokens] * len(ps))

        def through_decode(ps: list[list[int]] = ps) -> list[list[int]]:
            return decode_concurrently(backbones, head, ps, new_tokens)

        same = through_decode() == alone
        t_local, _ = median_time(in_process, repeats)
        t_remote, runs = median_time(through_decode, repeats)
        t_server, _ = median_time(
            lambda ps=ps, alone=alone: replay_concurrently(backbones, ps, alone),  # type: ignore[misc]
            repeats,
        )
        rows.append(
            {
                "sessions": k,
                "seconds": t_remote,
                "runs": runs,
                "tokens_per_s": k * new_tokens / t_remote,
                "server_tokens_per_s": k * new_tokens / t_server,
                "in_process_batch_tokens_per_s": k * new_tokens / t_local,
                "in_process_ms_per_token": 1000 * t_local / new_tokens,
                "same_tokens": same,
            }
        )
        one, r = rows[0], rows[-1]
        print(
            f"concurrent decode, {k} sessions: {r['tokens_per_s']:.1f} tokens/s "
            f"({r['tokens_per_s'] / one['tokens_per_s']:.2f}x one session; server alone "
            f"{r['server_tokens_per_s']:.1f}, "
            f"{r['server_tokens_per_s'] / one['server_tokens_per_s']:.2f}x; in-process batch "
            f"{k}: {r['in_process_batch_tokens_per_s']:.1f}), same tokens as alone: {same}"
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = new_parser("python -m benchmarks.serving", __doc__.splitlines()[0])
    parser.add_argument(
        "--pairs", type=positive_int, default=192, help="kjv_web pairs encoded per measurement"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=3, help="repeats of each measurement (median)"
    )
    parser.add_argument(
        "--gen-prompts", type=positive_int, default=4, help="prompts of the batch-1 decode rows"
    )
    parser.add_argument(
        "--gen-tokens", type=positive_int, default=32, help="tokens generated per prompt"
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=positive_int,
        default=4096,
        help="the coordinator's --max-batch-tokens",
    )
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--sessions",
        type=int,
        nargs="+",
        default=list(SESSION_COUNTS),
        help="concurrent Decode session counts",
    )
    parser.add_argument(
        "--decode-wait-ms",
        type=float,
        default=20.0,
        help="the coordinator's --decode-wait-ms",
    )
    parser.add_argument(
        "--conditions",
        default="a quiet machine",
        help="how the machine was shared while this ran, for the report",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="the coordinator's device: auto, cpu or cuda[:N]",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="folder for serving.md and serving.json",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    tokens = {f"t{i}": f"bench-token-{i}" for i in range(max(TENANT_COUNTS))}
    # Room for every concurrent session: each tenant holds up to its share of them.
    limits = TenantLimits(max_decode_sessions=max(args.sessions), max_concurrent_calls=64)
    config = CoordinatorConfig(
        tenants=tuple(Tenant(t, (hash_token(tok),), limits) for t, tok in tokens.items()),
        dtype="auto",
        device=args.device,
        decode_wait_seconds=args.decode_wait_ms / 1000,
        rpc_threads=max(32, 2 * max(args.sessions) + 8),
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        max_batch_tokens=args.max_batch_tokens,
        threads=args.threads,
    )
    lm, tokenizer = load_model(config)
    server = CoordinatorServer(config, lm, tokenizer)
    server.start()
    address = f"127.0.0.1:{server.port}"
    cache = Path(tempfile.mkdtemp(prefix="pema-serving-bench-"))
    clients = {
        t: CoordinatorClient(ClientConfig(address, tok, timeout=600)) for t, tok in tokens.items()
    }
    backbones = {t: CoordinatorBackbone(c, cache) for t, c in clients.items()}

    fmt = PromptFormat(tokenizer, DEFAULT_TEMPLATE)
    pairs = read_pairs(DATA, args.pairs)
    items = fmt.items(pairs)
    n_tokens = sum(len(i.prompt) + len(i.target) for i in items)
    n_keys = sum(len(i.target) for i in items)

    # Warm-up: first calls pay for allocator growth and lazy initialisation on both paths.
    lm.encode(items[:16], MemoryMode.TEACHER_FORCED)
    backbones["t0"].encode(items[:16], MemoryMode.TEACHER_FORCED)

    encode_rows: list[dict[str, Any]] = []
    t_local, runs = median_time(lambda: lm.encode(items, MemoryMode.TEACHER_FORCED), args.repeats)
    encode_rows.append(
        {
            "path": "in-process",
            "tenants": 1,
            "seconds": t_local,
            "runs": runs,
            "tokens_per_s": n_tokens / t_local,
            "ratio": 1.0,
        }
    )
    print(f"in-process encode: {n_tokens / t_local:.0f} tokens/s")
    for k in TENANT_COUNTS:
        bbs = [backbones[f"t{i}"] for i in range(k)]
        t_remote, runs = median_time(lambda bbs=bbs: encode_concurrently(bbs, items), args.repeats)  # type: ignore[misc]
        encode_rows.append(
            {
                "path": "gRPC",
                "tenants": k,
                "seconds": t_remote,
                "runs": runs,
                "tokens_per_s": n_tokens / t_remote,
                "ratio": t_local / t_remote,
            }
        )
        print(
            f"gRPC encode, {k} tenants: {n_tokens / t_remote:.0f} tokens/s "
            f"({t_local / t_remote:.2f} of in-process)"
        )

    # Generation: exactly gen_tokens steps per row (no stop ids), so both paths do equal work.
    adapter = PemaAdapter(
        AdapterConfig(
            hidden_size=lm.info.hidden_size,
            rank=64,
            variant="residual",
            key_norm="rms",
            lambda_max=0.5,
            schedule="constant",
        )
    ).eval()
    head = lm.head()
    prompts = [fmt.prompt_ids(p.source) for p in pairs[: args.gen_prompts]]
    mixing = Mixing(0.5, "constant")
    gen_rows: list[dict[str, Any]] = []
    for batch in (1, len(prompts)):
        ps = prompts[:batch]

        def run_gen(
            session_factory: Callable[[], Any], ps: list[list[int]] = ps
        ) -> list[list[int]]:
            return generate(
                session_factory(),
                head,
                ps,
                frozenset(),
                [args.gen_tokens] * len(ps),
                adapter,
                mixing,
                [args.gen_tokens] * len(ps),
            )

        local_out = run_gen(lm.session)
        remote_out = run_gen(backbones["t0"].session)
        same = local_out == remote_out
        t_l, _ = median_time(lambda: run_gen(lm.session), args.repeats)
        t_r, _ = median_time(lambda: run_gen(backbones["t0"].session), args.repeats)
        row = {
            "batch": batch,
            "tokens": args.gen_tokens,
            "local_ms_per_token": 1000 * t_l / args.gen_tokens,
            "remote_ms_per_token": 1000 * t_r / args.gen_tokens,
            "overhead": t_r / t_l - 1,
            "same_tokens": same,
        }
        gen_rows.append(row)
        print(
            f"generation batch {batch}: {row['local_ms_per_token']:.1f} ms/token in-process, "
            f"{row['remote_ms_per_token']:.1f} through Decode ({100 * row['overhead']:+.1f}%), "
            f"same tokens: {same}"
        )

    # Continuous batching: concurrent sessions, one per tenant in turn, plain greedy.
    decode_rows = concurrent_decode_rows(
        lm,
        [backbones[t] for t in sorted(backbones)],
        [fmt.prompt_ids(p.source) for p in pairs[: max(args.sessions)]],
        args.sessions,
        args.gen_tokens,
        args.repeats,
    )

    for c in clients.values():
        c.close()
    server.stop(grace=1.0)

    meta = {
        "model": lm.info.name,
        "revision": lm.info.revision,
        "dtype": lm.info.dtype,
        "device": str(lm.device),
        "decode_wait_ms": args.decode_wait_ms,
        "pairs": len(items),
        "input_tokens": n_tokens,
        "keys": n_keys,
        "repeats": args.repeats,
        "torch_threads": args.threads,
        "max_batch_tokens": args.max_batch_tokens,
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "decode_dtype": "float16",
        "conditions": args.conditions,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "serving.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "encode": encode_rows,
                "generation": gen_rows,
                "concurrent_decode": decode_rows,
            },
            indent=2,
        )
        + "\n"
    )
    lines = [
        "# Serving: coordinator vs in-process",
        "",
        f"Model {meta['model']} ({meta['dtype']} on {meta['device']}, revision "
        f"{meta['revision']}), "
        f"{meta['pairs']} kjv_web train pairs ({n_tokens} input tokens, {n_keys} keys), "
        f"teacher-forced; median of {args.repeats} runs; torch threads {args.threads}, "
        f"max batch tokens {args.max_batch_tokens}.",
        "",
        f"**Machine**: {meta['cpus']} CPU cores, {args.conditions} (load average at the end "
        f"{meta['load_average_at_end'][0]:.1f}, this benchmark's own threads included); server "
        "and tenant clients share these cores, so client-side work competes with the model.",
        "",
        "## Encode throughput",
        "",
        "| path | tenants | seconds | tokens/s | of in-process |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in encode_rows:
        lines.append(
            f"| {r['path']} | {r['tenants']} | {r['seconds']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {100 * r['ratio']:.0f}% |"
        )
    lines += [
        "",
        f"## Greedy PEMA generation ({args.gen_tokens} tokens per row, hidden states fp16 on "
        "the wire, untrained residual adapter mixed at constant λ 0.5)",
        "",
        "| batch | in-process ms/token | Decode ms/token | overhead | same tokens |",
        "| ---: | ---: | ---: | ---: | --- |",
    ]
    for g in gen_rows:
        lines.append(
            f"| {g['batch']} | {g['local_ms_per_token']:.1f} | "
            f"{g['remote_ms_per_token']:.1f} | {100 * g['overhead']:+.1f}% | "
            f"{g['same_tokens']} |"
        )
    one = decode_rows[0]["tokens_per_s"] if decode_rows else 0.0
    lines += [
        "",
        f"## Concurrent decode (continuous batching; {args.gen_tokens} tokens per session, batch "
        f"1 each, plain greedy, hidden states fp16 on the wire, --decode-wait-ms "
        f"{args.decode_wait_ms:g})",
        "",
        "*aggregate*: the sessions' clients compute their own logits (the tenant holds the head) "
        "on the same cores as the server; *server alone*: each session replays its greedy tokens, "
        "so only the coordinator's work is timed. *same tokens*: every session's output equals "
        f"its prompt's greedy output generated alone in-process ({meta['dtype']}).",
        "",
        "| sessions | seconds | aggregate tokens/s | vs one session | server alone tokens/s "
        "| vs one session | in-process batch tokens/s | same tokens |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    one_server = decode_rows[0]["server_tokens_per_s"] if decode_rows else 0.0
    for d in decode_rows:
        lines.append(
            f"| {d['sessions']} | {d['seconds']:.2f} | {d['tokens_per_s']:.1f} | "
            f"{d['tokens_per_s'] / one:.2f}x | {d['server_tokens_per_s']:.1f} | "
            f"{d['server_tokens_per_s'] / one_server:.2f}x | "
            f"{d['in_process_batch_tokens_per_s']:.1f} | {d['same_tokens']} |"
        )
    if decode_rows and decode_rows[0]["sessions"] == 1:
        d = decode_rows[0]
        remote_ms = 1000 * d["seconds"] / args.gen_tokens
        lines += [
            "",
            f"Batch-1 latency: {remote_ms:.1f} ms/token through Decode vs "
            f"{d['in_process_ms_per_token']:.1f} in-process greedy "
            f"({remote_ms / d['in_process_ms_per_token']:.2f}x).",
        ]
    lines += [
        "",
        "GPU: not measured (no GPU on this machine); `--device cuda` runs the same rows there.",
        "",
        "Reproduce: `python -m benchmarks.serving` (writes this file and serving.json).",
        "",
    ]
    (args.results / "serving.md").write_text("\n".join(lines))
    print((args.results / "serving.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
