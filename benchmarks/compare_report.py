"""compare.md and compare-<task>.png from compare.json (see benchmarks.compare)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import sacrebleu

from pema.evaluation import paired_bootstrap
from pema.settings import prior_label


def _interval(row: dict[str, Any], name: str) -> str:
    """The row's paired-bootstrap difference to baseline `name` (task_rows), or '' without one."""
    if name not in row:
        return ""
    d = row[name]
    text = f"{d['delta']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"
    return text if d["significant"] else f"{text} n.s."


def matched(cells: dict[str, Any]) -> tuple[str | None, list[str]]:
    """The generation digest shared by the model-generated cells, and the cells that differ."""
    digests = {k: c["test"]["trace"] for k, c in cells.items() if "trace" in c["test"]}
    if not digests:
        return None, []
    reference = digests.get("untuned", next(iter(digests.values())))
    return reference, sorted(k for k, d in digests.items() if d != reference)


def task_rows(entry: dict[str, Any], refs: list[str]) -> list[dict[str, Any]]:
    """The table's rows in the harness's method order, each with its intervals."""
    from benchmarks.compare import METHODS

    cells = entry["cells"]
    _, mismatched = matched(cells)

    def first_seed(method: str) -> list[str] | None:
        key = next((k for k in sorted(cells) if k.startswith(f"{method}/seed")), None)
        return cells[key]["test"]["outputs"] if key else None

    baselines = (
        ("vs_untuned", cells.get("untuned", {}).get("test", {}).get("outputs")),
        ("vs_lora", first_seed("lora")),
        ("vs_default", first_seed("pema")),  # what a tenant gets from pema-tenant train
    )
    out = []
    order = list(METHODS)
    for key, c in sorted(cells.items(), key=lambda kc: (order.index(kc[1]["method"]), kc[0])):
        if key in mismatched:
            continue
        hyps = c["test"]["outputs"]
        row = {"key": key, **c}
        for name, base in baselines:
            if base is not None and len(base) == len(hyps) == len(refs) and base is not hyps:
                row[name] = paired_bootstrap(hyps, base, refs)
        out.append(row)
    return out


def trained_params(cell: dict[str, Any]) -> int | None:
    """Parameters training changed: none where it took no step (the untrained prior)."""
    return 0 if cell.get("steps") == 0 else cell.get("trainable_params")


def valid_chrf(cell: dict[str, Any]) -> float | None:
    """The chrF on the valid prefix of the setting the cell chose there (None: not recorded)."""
    select = cell.get("select", {})
    chosen = select.get(cell.get("chosen", "-"))
    return None if chosen is None else float(chosen["chrf"])


def error_analysis(outputs: list[str], pairs: list[Any]) -> dict[str, int]:
    """Where an output loses to copying its source (sentence chrF), why, by counts: run-on
    (over 1.5x the reference's words), cut short (under half), off the source (most words in
    neither source nor reference), else substitutions (wording that copying got right)."""
    chrf = sacrebleu.CHRF()
    counts = {
        "rows": len(outputs),
        "loses_to_copy": 0,
        "run_on": 0,
        "cut_short": 0,
        "off_source": 0,
        "substitutions": 0,
    }
    for out, pair in zip(outputs, pairs, strict=True):
        ref = [pair.target]
        if chrf.sentence_score(out, ref).score >= chrf.sentence_score(pair.source, ref).score:
            continue
        counts["loses_to_copy"] += 1
        words, ref_words = out.split(), pair.target.split()
        known = {w.lower() for w in pair.source.split() + ref_words}
        if len(words) > 1.5 * len(ref_words):
            counts["run_on"] += 1
        elif len(words) < 0.5 * len(ref_words):
            counts["cut_short"] += 1
        elif sum(w.lower() not in known for w in words) > len(words) / 2:
            counts["off_source"] += 1
        else:
            counts["substitutions"] += 1
    return counts


def _num(v: Any, spec: str = "") -> str:
    return "" if v is None else format(v, spec)


def write_report(doc: dict[str, Any], folder: Path) -> None:
    from benchmarks.compare import METHODS, Protocol, rows

    m = doc.get("machine", {})
    lines = [
        "# Every method, matched",
        "",
        "Produced by `.venv/bin/python -m benchmarks.compare` (resumable; cells in compare.json).",
        f"Machine of the latest run (cells from earlier runs may have run on another 2-core "
        f"machine; the README says which): {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch threads "
        f"{m.get('torch_threads', '?')}, forward/generation dtype {m.get('dtype', '?')}. "
        "Each cell's load average at its start and end is in compare.json (the machine was "
        "shared with other work where it is above 2).",
        "",
    ]
    for task, entry in doc.items():
        if task == "machine":
            continue
        p = Protocol(**entry["protocol"])
        refs = [x.target for x in rows(p).test]
        digest, mismatched = matched(entry["cells"])
        lines += [
            f"## {task}",
            "",
            f"First {p.train_pairs} training pairs (rows cut to {p.max_tokens} tokens) for every "
            f"method; at most {p.max_epochs} epochs, validated after each on the last "
            f"{p.stop_pairs} valid.tsv pairs, best epoch kept, stopped when the validation loss "
            f"rises above both previous (DP rows: fixed epochs, no early stopping). Choices "
            f"(PEMA's λ) on the first {p.select_pairs} valid.tsv pairs. Scored on the first "
            f"{p.test_pairs} test pairs, greedy, {p.dtype}, cap L + L//2 + 10 tokens with "
            f"L = ⌈ρ·source tokens⌉, stop at newline or end of turn, batches of {p.batch_size}; "
            f"generation digest {digest} shared by every model row"
            + (f" (left out, digest differs: {', '.join(mismatched)})" if mismatched else "")
            + ".",
            "",
            "Δ chrF: this row minus the named one (LoRA and the PEMA default: their seed 0), "
            "paired bootstrap (1,000 resamples of the test rows), 95% interval; n.s. = the "
            "interval contains 0.",
            "",
            "| method | seed | epochs (best) | train s | peak RSS MiB | trained params "
            "| valid-prefix chrF | BLEU | chrF | Δ chrF vs untuned | Δ chrF vs LoRA "
            "| Δ chrF vs PEMA default |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
        ]
        for r in task_rows(entry, refs):
            epochs = r.get("epochs_run")
            best = r.get("best_epoch")
            lines.append(
                f"| {r['label']}{' (λ ' + r['chosen'] + ')' if r.get('chosen') else ''} "
                f"| {r['seed'] if METHODS[r['method']].seeded else ''} "
                f"| {_num(epochs)}{f' ({best})' if best else ''} | {_num(r.get('train_seconds'))} "
                f"| {_num(r.get('peak_rss_mib'))} | {_num(trained_params(r), ',')} "
                f"| {_num(valid_chrf(r), '.1f')} | {r['test']['bleu']:.1f} | {r['test']['chrf']:.1f} "
                f"| {_interval(r, 'vs_untuned')} "
                f"| {_interval(r, 'vs_lora')} "
                f"| {_interval(r, 'vs_default')} |"
            )
        choice = next(
            (
                c["source_prior_choice"]
                for c in entry["cells"].values()
                if c.get("source_prior_choice")
            ),
            None,
        )
        if choice:
            chrf = ", ".join(f"{g}: {v:.1f}" for g, v in choice["valid_chrf"].items())
            ce = ", ".join(f"{g}: {v:.3f}" for g, v in choice.get("stop_ce", {}).items())
            lines += [
                "",
                "The shipped default's source priors (β: bag of source tokens, γ: copy pointer), "
                "chosen as `pema-tenant train` chooses them (untrained outputs on the first valid "
                f"pairs, best chrF): {prior_label(choice['source_prior'], choice['copy_prior'])}, "
                f"λ {choice['lambda_max']:g} (chrF {chrf}). "
                f"Teacher-forced CE on the stop rows, the criterion not used: {ce}.",
            ]
        gates = [
            f"{k}: trained {c['valid_gate']['trained']:.1f} vs start {c['valid_gate']['start']:.1f}"
            + (
                f" [{c['valid_gate']['interval'][0]:+.1f}, {c['valid_gate']['interval'][1]:+.1f}]"
                if "interval" in c["valid_gate"]
                else ""
            )
            + f" → {c['valid_gate']['kept']} kept"
            for k, c in entry["cells"].items()
            if c.get("valid_gate")
        ]
        if gates:
            lines += [
                "",
                "The valid gate (as `pema-tenant train`: the trained adapter is kept only where it "
                "generates clearly better than its start on the valid pairs the priors were chosen "
                "on, the paired-bootstrap 95% interval of the difference, in brackets, above 0; "
                "cells without an interval ran the earlier rule, trained chrF above start; chrF): "
                f"{'; '.join(gates)}.",
            ]
        analysed = [
            (k, c)
            for k, c in entry["cells"].items()
            if "outputs" in next(iter(c.get("select", {}).values()), {})
        ]
        if analysed:
            select_pairs = rows(p).select
            lines += [
                "",
                f"Where outputs lose to copying the source, on the {p.select_pairs} valid.tsv "
                "prefix rows (sentence chrF below the source's; run-on: over 1.5x the "
                "reference's words; cut short: under half; off source: most words in neither "
                "source nor reference; else substitutions):",
                "",
                "| cell | rows | lose to copy | run-on | cut short | off source | substitutions |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            for key, c in analysed:
                chosen = c.get("chosen", "-")
                e = error_analysis(c["select"][chosen]["outputs"], select_pairs)
                lines.append(
                    f"| {key} | {e['rows']} | {e['loses_to_copy']} | {e['run_on']} "
                    f"| {e['cut_short']} | {e['off_source']} | {e['substitutions']} |"
                )
        missing = [
            k for k in METHODS if not any(c == k or c.startswith(k + "/") for c in entry["cells"])
        ]
        if missing:
            lines += ["", f"Not run yet: {', '.join(missing)}."]
        lines.append("")
        plot(task, entry, folder / f"compare-{task}.png")
        lines += [f"![{task}](compare-{task}.png)", ""]
    lines += curves(doc, folder)
    (folder / "compare.md").write_text("\n".join(lines))


CURVE_METHODS = ("copy", "untuned", "pema", "lora")


def curves(doc: dict[str, Any], folder: Path) -> list[str]:
    """Learning curves: per task, the core rows at every training-pair count run (one
    compare.json entry per count), with their intervals at that count; and curve-<task>.png."""
    from benchmarks.compare import METHODS, Protocol, model_task, rows

    lines: list[str] = []
    by_task: dict[str, list[tuple[Protocol, dict[str, Any]]]] = {}
    for key, entry in doc.items():
        if key != "machine":
            p = Protocol(**entry["protocol"])
            by_task.setdefault(model_task(p), []).append((p, entry))
    for task, points in by_task.items():
        if len({p.train_pairs for p, _ in points}) < 2:
            continue
        points.sort(key=lambda pe: pe[0].train_pairs)
        lines += [
            f"## {task}: learning curve",
            "",
            "The core rows at each training-pair count (each count's own entry above: its own "
            "memories, prior choice, untuned cap ρ and intervals; the epoch cap is the entry's).",
            "",
            "| training pairs | max epochs | method | seed | train s | peak RSS MiB | chrF "
            "| Δ chrF vs untuned | Δ chrF vs LoRA |",
            "|---:|---:|---|---:|---:|---:|---:|---|---|",
        ]
        series: dict[str, dict[int, list[float]]] = {}  # method -> pairs -> chrF of each seed
        for p, entry in points:
            refs = [x.target for x in rows(p).test]
            for r in task_rows(entry, refs):
                if r["method"] not in CURVE_METHODS:
                    continue
                at = series.setdefault(r["method"], {}).setdefault(p.train_pairs, [])
                at.append(r["test"]["chrf"])
                lines.append(
                    f"| {p.train_pairs} | {p.max_epochs} | {r['method']} "
                    f"| {r['seed'] if METHODS[r['method']].seeded else ''} "
                    f"| {_num(r.get('train_seconds'))} | {_num(r.get('peak_rss_mib'))} "
                    f"| {r['test']['chrf']:.1f} "
                    f"| {_interval(r, 'vs_untuned')} "
                    f"| {_interval(r, 'vs_lora')} |"
                )
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for method, by_pairs in sorted(series.items()):
            xs = sorted(by_pairs)
            ax.plot(xs, [statistics.mean(by_pairs[n]) for n in xs], marker="o",
                    ls="--" if method in ("copy", "untuned") else "-", label=method)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("training pairs (log)")
        ax.set_ylabel("test chrF (mean over seeds)")
        ax.set_title(f"{task}: learning curve")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / f"curve-{task}.png", dpi=110)
        plt.close(fig)
        lines += ["", f"![{task} learning curve](curve-{task}.png)", ""]
    return lines


def plot(task: str, entry: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    cells = entry["cells"]
    for ax, x_key, x_label in (
        (axes[0], "peak_rss_mib", "training peak RSS (MiB, log)"),
        (axes[1], "train_seconds", "training seconds (log)"),
    ):
        for key, c in cells.items():
            if c.get(x_key):
                ax.scatter(c[x_key], c["test"]["chrf"], marker="o" if "pema" in key else "s")
                ax.annotate(key, (c[x_key], c["test"]["chrf"]), fontsize=7)
        for name in ("untuned", "copy"):
            if name in cells:
                ax.axhline(cells[name]["test"]["chrf"], ls="--", lw=0.8, color="grey")
                ax.annotate(
                    name,
                    (1, cells[name]["test"]["chrf"]),
                    xycoords=("axes fraction", "data"),
                    fontsize=7,
                    ha="right",
                )
        ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel("test chrF")
        ax.set_title(task)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    results = Path(__file__).resolve().parent / "results"
    write_report(json.loads((results / "compare.json").read_text()), results)
    sys.exit(0)
