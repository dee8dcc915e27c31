"""Render benchmarks/results/quality.json (the cells of benchmarks/quality.py) as Markdown."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def write_report(data: dict[str, Any], path: Path) -> None:
    setup = data.get("setup", {})
    lines = [
        "# Quality benchmark",
        "",
        f"Model {setup.get('model')} (revision {setup.get('revision')}, forward in "
        f"{setup.get('forward_dtype')}, {setup.get('torch_threads')} torch threads). Produced by "
        "`python -m benchmarks.quality`; every cell is in quality.json. Mixing settings are chosen on "
        "a valid.tsv prefix (chrF), never on test; test rows are a fixed prefix of test.tsv.",
        "",
    ]
    tasks = sorted({k.split("/")[0] for k in data if "/" in k})
    for task in tasks:
        cells = {k[len(task) + 1 :]: v for k, v in data.items() if k.startswith(task + "/")}
        lines += [
            f"## {task}",
            "",
            "| system | memory | test BLEU | test chrF | valid chrF |",
            "|---|---|---:|---:|---:|",
        ]
        for name in ("copy-source", "untuned"):
            t, v = cells.get(f"{name}/test"), cells.get(f"{name}/valid")
            if t:
                lines.append(f"| {name} | | {t['bleu']} | {t['chrf']} | {v['chrf'] if v else ''} |")
        runs = sorted({(*k.split("/")[:3], k.split("/")[4]) for k in cells if k.count("/") == 4})
        for n, mode, variant, tag in runs:
            test = cells.get(f"{n}/{mode}/{variant}/test/{tag}")
            valid = cells.get(f"{n}/{mode}/{variant}/valid/{tag}")
            chosen = cells.get(f"{n}/{mode}/{variant}/chosen_on_valid") == tag
            label = f"PEMA {variant}, {tag.replace('-', ' λ ')}" + (
                " (chosen on valid)" if chosen else ""
            )
            lines.append(
                f"| {label} | {mode}, {n[1:]} pairs | {test['bleu'] if test else '–'} | "
                f"{test['chrf'] if test else '–'} | {valid['chrf'] if valid else ''} |"
            )
        lines += [
            "",
            "| training run | keys | build s | train s | s/epoch | peak RSS MiB | valid top-1 | model top-1 | valid CE | model CE |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for key, value in sorted(cells.items()):
            parts = key.split("/")
            if len(parts) == 4 and parts[3] == "train":
                n, mode, variant, _ = parts
                mem = cells.get(f"{n}/memory/{mode}", {})
                v = value["valid"]
                lines.append(
                    f"| {variant}, {mode}, {n[1:]} pairs | {mem.get('keys', '')} | {mem.get('build_seconds', '')} | "
                    f"{value['train_seconds']} | {value['seconds_per_epoch']} | {_mib(value['peak_rss_bytes'])} | "
                    f"{v['top1']:.3f} | {v['model_top1']:.3f} | {v['ce']:.3f} | {v.get('model_ce', float('nan')):.3f} |"
                )
        for key, value in sorted(cells.items()):
            if key.endswith("/memory/teacher-forced") or key.endswith("/memory/free-running"):
                lines.append("")
                lines.append(
                    f"Keys of `{key}`: mean |x| {value['mean_abs']}, 99.9th percentile {value['p99_9_abs']}, "
                    f"max {value['max_abs']} (fp16 holds up to 65,504)."
                )
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    src = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).parent / "results" / "quality.json"
    )
    write_report(json.loads(src.read_text()), src.with_suffix(".md"))
