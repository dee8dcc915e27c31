"""Serving benchmark: the coordinator's Encode throughput and Decode latency against in-process.

One process hosts the real default model (in the faster forward dtype here) behind a real gRPC server on localhost; the
tenants are client threads in the same process, each with its own channel and token. The
in-process baseline runs the *same* FrozenLM object on the same items while the server is idle.

- Encode: teacher-forced keys for N kjv_web pairs, split evenly among 1, 4 and 8 concurrent
  tenants; input tokens (prompt + target) per second, median of repeats.
- Generation: greedy PEMA generation (untrained residual adapter, constant λ, so P_PEMA is
  computed every step) through Decode vs a LocalSession; seconds per generated token.

Run: `python -m benchmarks.serving [--pairs 192] [--repeats 3]`; writes
benchmarks/results/serving.md and serving.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from coordinator.config import CoordinatorConfig, Tenant, hash_token
from coordinator.server import CoordinatorServer, load_model
from pema.adapter import AdapterConfig, PemaAdapter
from pema.backbone import EncodeItem, MemoryMode
from pema.data import read_pairs, shared_data_dir
from pema.generation import Mixing, generate
from pema.process import median_time
from pema.prompts import DEFAULT_TEMPLATE, PromptFormat
from tenant.coordinator_client import ClientConfig, CoordinatorBackbone, CoordinatorClient

DATA = shared_data_dir() / "kjv_web" / "train.tsv"
RESULTS = Path(__file__).resolve().parent / "results"
TENANT_COUNTS = (1, 4, 8)


def encode_concurrently(backbones: Sequence[CoordinatorBackbone], items: list[EncodeItem]) -> None:
    shards = [items[i :: len(backbones)] for i in range(len(backbones))]
    errors: list[BaseException] = []

    def run(bb: CoordinatorBackbone, shard: list[EncodeItem]) -> None:
        try:
            bb.encode(shard, MemoryMode.TEACHER_FORCED)
        except BaseException as e:
            errors.append(e)

    threads = [
        threading.Thread(target=run, args=(bb, s)) for bb, s in zip(backbones, shards, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gen-prompts", type=int, default=4)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--max-batch-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    tokens = {f"t{i}": f"bench-token-{i}" for i in range(max(TENANT_COUNTS))}
    config = CoordinatorConfig(
        tenants=tuple(Tenant(t, (hash_token(tok),)) for t, tok in tokens.items()),
        dtype="auto",
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

    for c in clients.values():
        c.close()
    server.stop(grace=1.0)

    meta = {
        "model": lm.info.name,
        "revision": lm.info.revision,
        "dtype": lm.info.dtype,
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
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving.json").write_text(
        json.dumps({"meta": meta, "encode": encode_rows, "generation": gen_rows}, indent=2) + "\n"
    )
    lines = [
        "# Serving: coordinator vs in-process",
        "",
        f"Model {meta['model']} ({meta['dtype']}, revision {meta['revision']}), "
        f"{meta['pairs']} kjv_web train pairs ({n_tokens} input tokens, {n_keys} keys), "
        f"teacher-forced; median of {args.repeats} runs; torch threads {args.threads}, "
        f"max batch tokens {args.max_batch_tokens}.",
        "",
        f"**Machine**: {meta['cpus']} CPU cores *shared with other agents' jobs* (load average "
        f"at the end {meta['load_average_at_end'][0]:.1f}); server and tenant clients share "
        "the same two cores, so client-side deserialisation competes with the model. Treat "
        "ratios as indicative.",
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
    lines += [
        "",
        "Reproduce: `python -m benchmarks.serving` (writes this file and serving.json).",
        "",
    ]
    (RESULTS / "serving.md").write_text("\n".join(lines))
    print((RESULTS / "serving.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
