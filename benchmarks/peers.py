"""PEMA against its full-access peers: quality against training memory and time.

    .venv/bin/python -m benchmarks.peers [--train-pairs 256 --test-pairs 40 ...]

Every run is its own subprocess, so its peak RSS (VmHWM) is that run's own. Peers run through
`python -m pema.peers.cli train-eval`; PEMA runs in two steps: one process builds the memories with
the model (timed, reported separately), then each PEMA variant trains in a fresh process that holds
only what a tenant holds (head + adapter + memory), and its peak RSS is read before the model is
loaded for evaluation. Results accumulate in peers.json (finished runs are not redone).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from transformers import AutoTokenizer

from pema.adapter import AdapterConfig, PemaAdapter, save_adapter
from pema.backbone import MemoryMode
from pema.data import read_pairs, shared_data_dir
from pema.generation import Mixing, token_ratio
from pema.head import LMHead, load_head, save_head
from pema.memory import Memory, build_memory, memory_spec
from pema.models import default_model_dir
from pema.peers.cli import peak_rss_mib
from pema.peers.sft import encode_pairs
from pema.prompts import TASK_TEMPLATES, PromptFormat
from pema.training import TrainConfig, train_adapter
from tenant.backend import local_backend
from tenant.cli import BEST
from tenant.jobs import evaluate_job

DATA = shared_data_dir()
RESULTS = Path(__file__).parent / "results"
WORK = Path("/tmp/pema-peers-bench")
PEER_RUNS = {
    "untuned": ["--method", "untuned"],
    "copy-source": ["--method", "copy"],
    "full FT": ["--method", "full"],
    "LoRA": ["--method", "lora"],
    "AdaMix": ["--method", "adamix"],
    "SLaSh": ["--method", "slash"],
    "JR-WARP": ["--method", "jrwarp"],
    "JR-WARP DP ε=8": ["--method", "jrwarp", "--dp-epsilon", "8"],
    "JR-WARP DP ε=3": ["--method", "jrwarp", "--dp-epsilon", "3"],
}
PEMA_RUNS: dict[str, dict[str, Any]] = {
    "PEMA": {},
    "PEMA-mix": {"mixture": 4},
    "PEMA DP ε=8": {"dp_epsilon": 8.0},
    "PEMA DP ε=3": {"dp_epsilon": 3.0},
}


def _files(dataset: str) -> dict[str, Path]:
    return {s: DATA / dataset / f"{s}.tsv" for s in ("train", "valid", "test")}


def _work(dataset: str, args: argparse.Namespace) -> Path:
    return WORK / f"{dataset}-{args.train_pairs}-{args.max_tokens}"


def build_memories(dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    """With the model: the head and teacher-forced memories of the same truncated pairs the peers
    train on (and of validation pairs, for early stopping)."""
    files, work = _files(dataset), _work(dataset, args)
    work.mkdir(parents=True, exist_ok=True)
    backend = local_backend()
    fmt = PromptFormat(backend.tokenizer, TASK_TEMPLATES[dataset])
    start = time.perf_counter()
    for split, n in (("train", args.train_pairs), ("valid", args.valid_pairs)):
        pairs = read_pairs(files[split], n)
        spec = memory_spec(
            backend.backbone.info, pairs, TASK_TEMPLATES[dataset], MemoryMode.TEACHER_FORCED
        )
        items = encode_pairs(fmt, pairs, args.max_tokens)
        build_memory(backend.backbone, items, spec).save(work / f"{split}.memory")
    save_head(backend.backbone.head().spec, work / "head.safetensors")
    return {
        "memory_build_seconds": round(time.perf_counter() - start, 1),
        "forward_dtype": backend.backbone.info.dtype,
    }


def train_pema(dataset: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train like `pema-tenant train` with its defaults (tenant.cli.BEST) from the saved memory,
    holding no model; then load the model to evaluate."""
    files, work = _files(dataset), _work(dataset, args)
    changes = PEMA_RUNS[name]
    best: dict[str, Any] = dict(BEST)
    train_pairs = read_pairs(files["train"], args.train_pairs)
    head = LMHead(load_head(work / "head.safetensors"))
    train_mem, valid_mem = Memory.load(work / "train.memory"), Memory.load(work / "valid.memory")
    fmt = PromptFormat(AutoTokenizer.from_pretrained(default_model_dir()), TASK_TEMPLATES[dataset])
    rho = token_ratio(
        [len(fmt.text_ids(p.source)) for p in train_pairs],
        [len(fmt.target_ids(p.target)) for p in train_pairs],
    )
    config = AdapterConfig(
        hidden_size=head.hidden_size,
        rank=best["rank"],
        variant=best["variant"],
        key_norm=best["key_norm"],
        kappa=best["kappa"],
        lambda_max=best["lambda_max"],
        schedule=best["schedule"],
        rho=rho,
        template=TASK_TEMPLATES[dataset],
        memory_mode=best["memory_mode"],
        mixture=int(changes.get("mixture", 1)),
        # DP replays the adapter per sample, which a random dropout mask would break.
        dropout=0.0 if "dp_epsilon" in changes else 0.2,
    )
    cfg = TrainConfig(
        lr=best["lr"],
        batch_size=best["batch_size"],
        epochs=best["epochs"],
        dp_epsilon=changes.get("dp_epsilon"),
    )
    adapter = PemaAdapter(config)
    trainable = sum(p.numel() for p in adapter.parameters() if p is not adapter.B_rct) - (
        adapter.A.numel() if adapter.A_mix is not None else 0
    )
    report = train_adapter(adapter, head, train_mem, valid_mem, cfg)
    peak = peak_rss_mib()
    out = work / name.replace(" ", "_")
    save_adapter(adapter, out)
    epochs = sum(p.epochs_run for p in report.phases.values())
    train_keys = len(train_mem)
    del head, train_mem, valid_mem
    backend = local_backend()
    test = read_pairs(files["test"], args.test_pairs)
    scores = evaluate_job(
        backend, adapter, test, Mixing(config.lambda_max, config.schedule), False, quiet=True
    )
    return {
        "method": name,
        "train_pairs": len(train_pairs),
        "train_keys": train_keys,
        "trainable_params": trainable,
        "served_params": sum(t.numel() for t in adapter.inference_state().values()),
        "epochs": epochs,
        "steps": sum(p.steps for p in report.phases.values()),
        "train_seconds": round(report.seconds, 1),
        "seconds_per_epoch": round(report.seconds / max(epochs, 1), 1),
        "train_peak_rss_mib": peak,
        "privacy": report.privacy,
        "valid_top1": round(report.valid["top1"], 4),
        "bleu": scores["bleu"],
        "chrf": scores["chrf"],
        "samples": scores["outputs"][:3],
    }


def _subprocess_json(cmd: list[str]) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def run_all(args: argparse.Namespace) -> None:
    json_path = RESULTS / "peers.json"
    doc: dict[str, Any] = json.loads(json_path.read_text()) if json_path.is_file() else {}
    sizes = {
        k: getattr(args, k)
        for k in ("train_pairs", "valid_pairs", "test_pairs", "epochs", "max_tokens")
    }
    if doc.get("sizes") != sizes:
        doc = {"sizes": sizes, "runs": {}}
    me = [sys.executable, "-m", "benchmarks.peers"]
    common = [f"--{k.replace('_', '-')}={v}" for k, v in sizes.items()]
    for dataset in args.datasets:
        runs = doc["runs"].setdefault(dataset, {})
        files = _files(dataset)
        peer_cmd = {
            name: [sys.executable, "-m", "pema.peers.cli", "train-eval", *flags,
                   "--train", str(files["train"]), "--test", str(files["test"]),
                   "--template", TASK_TEMPLATES[dataset],
                   "--max-pairs", str(args.train_pairs), "--limit", str(args.test_pairs),
                   "--epochs", str(args.epochs), "--max-tokens", str(args.max_tokens)]
            for name, flags in PEER_RUNS.items()
        }  # fmt: skip
        pema_cmd = {name: [*me, "pema", dataset, name, *common] for name in PEMA_RUNS}
        # The comparison the issue asks about first (PEMA against LoRA and full FT), then the rest.
        order = ["copy-source", "LoRA", "full FT", "memory build", "PEMA", "untuned", "AdaMix",
                 "SLaSh", "JR-WARP", "PEMA-mix", "PEMA DP ε=8", "PEMA DP ε=3",
                 "JR-WARP DP ε=8", "JR-WARP DP ε=3"]  # fmt: skip
        commands = {**peer_cmd, "memory build": [*me, "memory", dataset, *common], **pema_cmd}
        plan = [(name, commands[name]) for name in order]
        memories_on_disk = (_work(dataset, args) / "head.safetensors").exists()
        for name, cmd in plan:
            # The memories live in /tmp: a resumed run rebuilds them if they are gone.
            if name in runs and (name != "memory build" or memories_on_disk):
                continue
            start = time.perf_counter()
            print(f"[{dataset}] {name} ...", file=sys.stderr, flush=True)
            runs[name] = {
                **_subprocess_json(cmd),
                "wall_seconds": round(time.perf_counter() - start, 1),
            }
            json_path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
            write_report(doc)


def _fmt(v: Any, spec: str = "") -> str:
    return "" if v is None else format(v, spec)


def write_report(doc: dict[str, Any]) -> None:
    s = doc["sizes"]
    lines = [
        "# PEMA against its peers",
        "",
        f"SmolLM2-135M-Instruct, CPU (2 shared cores). Same first {s['train_pairs']} training pairs "
        f"and first {s['test_pairs']} test pairs for every method, {s['epochs']} epoch(s) for the "
        f"peers, rows capped at {s['max_tokens']} tokens (prompt + target); PEMA trains with the "
        f"`pema-tenant train` defaults (rank 64, residual, 8 epochs with early stopping on "
        f"{s['valid_pairs']} validation pairs). Peak RSS is the training process's VmHWM "
        f"(peers: fp32 model + optimizer; PEMA: head + adapter + memory, no model). DP: δ = 1/(2N), "
        f"N = training pairs, the privacy unit is a pair.",
        "",
        "Produced by `.venv/bin/python -m benchmarks.peers`.",
        "",
    ]
    for dataset, runs in doc["runs"].items():
        lines += [
            f"## {dataset}",
            "",
            "| method | trainable params | served params | peak RSS MiB | s/epoch | train s | BLEU | chrF | ε spent |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in runs.items():
            if name == "memory build":
                continue
            eps = (r.get("privacy") or {}).get("epsilon_spent")
            lines.append(
                f"| {name} | {_fmt(r.get('trainable_params'), ',')} | {_fmt(r.get('served_params'), ',')} "
                f"| {_fmt(r.get('train_peak_rss_mib'))} | {_fmt(r.get('seconds_per_epoch'))} "
                f"| {_fmt(r.get('train_seconds'))} | {r['bleu']:.2f} | {r['chrf']:.2f} | {_fmt(eps)} |"
            )
        if "memory build" in runs:
            lines.append("")
            lines.append(
                f"PEMA memory build (with the model, "
                f"{runs['memory build'].get('forward_dtype', 'bfloat16')}, train + valid): "
                f"{runs['memory build']['memory_build_seconds']} s."
            )
        lines.append("")
    (RESULTS / "peers.md").write_text("\n".join(lines))
    plot(doc)


def plot(doc: dict[str, Any]) -> None:
    datasets = list(doc["runs"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for name, r in doc["runs"][dataset].items():
            if r.get("train_peak_rss_mib") is None or name == "untuned":
                continue
            ax.scatter(r["train_peak_rss_mib"], r["chrf"], marker="o" if "PEMA" in name else "s")
            ax.annotate(name, (r["train_peak_rss_mib"], r["chrf"]), fontsize=8)
        for name in ("untuned", "copy-source"):
            if name in doc["runs"][dataset]:
                ax.axhline(doc["runs"][dataset][name]["chrf"], ls="--", lw=0.8, color="grey")
                ax.text(ax.get_xlim()[0], doc["runs"][dataset][name]["chrf"], name, fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("training peak RSS (MiB, log)")
        ax.set_ylabel("chrF")
        ax.set_title(dataset)
    fig.tight_layout()
    fig.savefig(RESULTS / "peers.png", dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__)
    p.add_argument("step", nargs="?", choices=["all", "memory", "pema"], default="all")
    p.add_argument("dataset", nargs="?")
    p.add_argument("run", nargs="?")
    p.add_argument("--datasets", nargs="+", default=["kjv_web", "web_es"])
    p.add_argument("--train-pairs", type=int, default=256)
    p.add_argument("--valid-pairs", type=int, default=100)
    p.add_argument("--test-pairs", type=int, default=40)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=160)
    args = p.parse_args()
    if args.step == "memory":
        print(json.dumps(build_memories(args.dataset, args)))
    elif args.step == "pema":
        print(json.dumps(train_pema(args.dataset, args.run, args), ensure_ascii=False))
    else:
        run_all(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
