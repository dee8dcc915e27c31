"""Forward dtype on this CPU: the default model's teacher-forced forward (what memory building
and Encode run) and the head's training matmul, in bf16 and fp32, side by side in one process,
and what `auto` (pema.dtypes) picks. Writes benchmarks/results/dtype.md and .json.

Run: `python -m benchmarks.dtype [--repeats 3] [--threads 2]`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from pema.dtypes import fastest_matmul_dtype
from pema.models import default_model_dir, load_causal_lm
from pema.process import median_time

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = (torch.float32, torch.bfloat16)


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
        [],
    )
    return sorted(
        f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    )


def measure(
    dtype: torch.dtype, ids: torch.Tensor, keys: torch.Tensor, repeats: int
) -> dict[str, float]:
    model, _ = load_causal_lm(default_model_dir(), dtype)
    weight = model.get_output_embeddings().weight.detach().to(dtype)
    with torch.no_grad():
        model.model(input_ids=ids)  # warm-up
        forward, _ = median_time(lambda: model.model(input_ids=ids), repeats)
        keys.to(dtype) @ weight.T
        head, _ = median_time(lambda: keys.to(dtype) @ weight.T, repeats)
    return {
        "forward_seconds": round(forward, 3),
        "forward_tokens_per_second": round(ids.numel() / forward, 1),
        "head_matmul_seconds": round(head, 4),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=96)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(
        0, 49152, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0)
    )
    keys = torch.randn(2048, 576)
    rows = {str(d).removeprefix("torch."): measure(d, ids, keys, args.repeats) for d in DTYPES}
    result = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_flags": cpu_flags(),
        "threads": args.threads,
        "batch": [args.batch, args.tokens],
        "head_matmul": "2,048 keys x 49,152 vocabulary rows",
        "rows": rows,
        "auto_picks": str(fastest_matmul_dtype()).removeprefix("torch."),
        "bf16_over_fp32_forward_time": round(
            rows["bfloat16"]["forward_seconds"] / rows["float32"]["forward_seconds"], 2
        ),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dtype.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Forward dtype on this CPU",
        "",
        f"`python -m benchmarks.dtype --repeats {args.repeats} --threads {args.threads}`; CPU flags "
        f"{', '.join(result['cpu_flags']) or 'unknown'}; median of {args.repeats} runs after a warm-up.",
        "",
        f"| dtype | forward {args.batch}x{args.tokens} tokens, s | tokens/s | head matmul (2,048 x 49,152), s |",
        "|---|---:|---:|---:|",
        *(
            f"| {n} | {r['forward_seconds']} | {r['forward_tokens_per_second']} | {r['head_matmul_seconds']} |"
            for n, r in rows.items()
        ),
        "",
        f"bf16 forward time / fp32: {result['bf16_over_fp32_forward_time']}. `auto` picks "
        f"**{result['auto_picks']}**.",
        "",
    ]
    (RESULTS / "dtype.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
