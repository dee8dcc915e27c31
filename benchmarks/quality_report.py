"""Render benchmarks/results/quality-{dtype}.json (the cells of benchmarks/quality.py, one file per
forward dtype) as one Markdown report, benchmarks/results/quality.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.quality import DEFAULT_MIXING, mixing_tag

DEFAULT = mixing_tag(DEFAULT_MIXING)  # pema-tenant train's mixing


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def default_choice(
    files: dict[str, dict[str, Any]], variant: str = "residual"
) -> dict[str, Any] | None:
    """The one mixing a default must use for every task, chosen on valid only. Per task, the
    largest teacher-forced run of `variant` in any results file (at equal size, the one that tried
    more mixings); each mixing's valid chrF gain over the untuned model of the same file; chosen:
    the mixing whose smallest gain across tasks is largest (a default must not make any task
    worse). None until every task has a run with valid cells."""
    tasks = sorted(
        {k.split("/")[0] for d in files.values() for k in d if k.endswith("/untuned/valid")}
    )
    gains: dict[str, dict[str, float]] = {}  # mixing -> task -> gain
    runs: dict[str, str] = {}
    for task in tasks:
        candidates = []
        for name, data in files.items():
            for key in data:
                if key.startswith(f"{task}/n") and key.endswith(f"/teacher-forced/{variant}/train"):
                    run = key.removesuffix("/train")
                    tried = sum(k.startswith(f"{run}/valid/") for k in data)
                    candidates.append((int(key.split("/")[1][1:]), tried, name, run))
        if not candidates:
            return None
        _, _, name, run = max(candidates)
        runs[task] = f"{name}: {run}"
        data = files[name]
        untuned = data[f"{task}/untuned/valid"]["chrf"]
        for key, cell in data.items():
            if key.startswith(f"{run}/valid/"):
                gains.setdefault(key.rsplit("/", 1)[1], {})[task] = cell["chrf"] - untuned
    complete = {m: g for m, g in gains.items() if len(g) == len(tasks)}
    if not complete:
        return None
    best = max(complete, key=lambda m: min(complete[m].values()))
    return {"mixing": best, "runs": runs, "gains": complete}


def _default_section(files: dict[str, dict[str, Any]]) -> list[str]:
    choice = default_choice(files)
    if choice is None:
        return []
    tasks = sorted(choice["runs"])
    lines = [
        "## The default mixing (chosen on valid across tasks)",
        "",
        "`pema-tenant train` needs one mixing for every task. Per task the largest teacher-forced "
        "residual run, valid chrF gain over the untuned model in the same forward dtype; chosen: "
        "the mixing whose worst gain is largest. Runs: "
        + ", ".join(f"`{r}`" for r in choice["runs"].values())
        + f". `pema-tenant train` defaults to {DEFAULT}.",
        "",
        "| mixing | " + " | ".join(tasks) + " | worst |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    for mixing, gains in sorted(choice["gains"].items(), key=lambda kv: -min(kv[1].values())):
        mark = " (chosen)" if mixing == choice["mixing"] else ""
        cells = " | ".join(f"{gains[t]:+.2f}" for t in tasks)
        lines.append(f"| {mixing}{mark} | {cells} | {min(gains.values()):+.2f} |")
    return [*lines, ""]


def write_report(folder: Path) -> None:
    """quality.md in `folder` from every quality-{dtype}.json there."""
    files = {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("quality-*.json"))}
    lines = [
        "# Quality benchmark",
        "",
        "Produced by `python -m benchmarks.quality`; the cells are in quality-{forward dtype}.json "
        "(the model runs in the faster dtype of the machine that measured: pema.dtypes). Mixing "
        "settings are chosen on a valid.tsv prefix (chrF), never on test; test rows are a fixed "
        "prefix of test.tsv.",
        "",
    ]
    for name, data in files.items():
        lines += _file_section(name, data)
    lines += _default_section(files)
    (folder / "quality.md").write_text("\n".join(lines) + "\n")


def _file_section(name: str, data: dict[str, Any]) -> list[str]:
    setup = data.get("setup", {})
    lines = [
        f"## {name}: forward in {setup.get('forward_dtype')}",
        "",
        f"Model {setup.get('model')} (revision {setup.get('revision')}, "
        f"{setup.get('torch_threads')} torch threads). {setup.get('note', '')}",
        "",
    ]
    tasks = sorted({k.split("/")[0] for k in data if "/" in k})
    for task in tasks:
        cells = {k[len(task) + 1 :]: v for k, v in data.items() if k.startswith(task + "/")}
        lines += [
            f"### {task} ({setup.get('forward_dtype')})",
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
    return lines


if __name__ == "__main__":
    write_report(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results")
