"""Render benchmarks/results/quality.json (the cells of benchmarks/quality.py) as Markdown."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def default_choice(data: dict[str, Any], variant: str = "residual") -> dict[str, Any] | None:
    """The one mixing a default must use for every task, chosen on valid only: per task the
    largest teacher-forced run of `variant`, the gain of each mixing's valid chrF over the untuned
    model's, and the mixing whose smallest gain across tasks is largest (a default must not make
    any task worse). None until every task has a run with valid cells."""
    tasks = sorted({k.split("/")[0] for k in data if k.endswith("/untuned/valid")})
    gains: dict[str, dict[str, float]] = {}  # mixing -> task -> gain
    runs: dict[str, str] = {}
    for task in tasks:
        sizes = [
            int(k.split("/")[1][1:])
            for k in data
            if k.startswith(f"{task}/n") and k.endswith(f"/teacher-forced/{variant}/train")
        ]
        if not sizes:
            return None
        run = f"{task}/n{max(sizes)}/teacher-forced/{variant}"
        runs[task] = run
        untuned = data[f"{task}/untuned/valid"]["chrf"]
        for key, cell in data.items():
            if key.startswith(f"{run}/valid/"):
                gains.setdefault(key.rsplit("/", 1)[1], {})[task] = cell["chrf"] - untuned
    complete = {m: g for m, g in gains.items() if len(g) == len(tasks)}
    if not complete:
        return None
    best = max(complete, key=lambda m: min(complete[m].values()))
    return {"mixing": best, "runs": runs, "gains": complete}


def _default_section(data: dict[str, Any]) -> list[str]:
    choice = default_choice(data)
    if choice is None:
        return []
    tasks = sorted(choice["runs"])
    lines = [
        "## The default mixing (chosen on valid across tasks)",
        "",
        "`pema-tenant train` needs one mixing for every task. Per task the largest teacher-forced "
        "residual run, valid chrF gain over the untuned model; chosen: the mixing whose worst "
        "gain is largest. Runs: " + ", ".join(f"`{r}`" for r in choice["runs"].values()) + ".",
        "",
        "| mixing | " + " | ".join(tasks) + " | worst |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    for mixing, gains in sorted(choice["gains"].items(), key=lambda kv: -min(kv[1].values())):
        mark = " (chosen)" if mixing == choice["mixing"] else ""
        cells = " | ".join(f"{gains[t]:+.2f}" for t in tasks)
        lines.append(f"| {mixing}{mark} | {cells} | {min(gains.values()):+.2f} |")
    return [*lines, ""]


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
    lines += _default_section(data)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    src = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).parent / "results" / "quality.json"
    )
    write_report(json.loads(src.read_text()), src.with_suffix(".md"))
