"""One matched comparison of every method: PEMA recipes, its full-access peers, the untuned model
and copy-the-source, under one protocol.

    .venv/bin/python -m benchmarks.compare [--tasks kjv_web web_es] [--methods ...] [--seeds 0 1]

Every method trains on the same first N training pairs (rows cut to the same token cap), for at
most the same number of epochs, validating after each epoch on the same held-apart valid.tsv
suffix and keeping its best epoch under one early-stopping rule (pema.training.EarlyStop). Each
method's free choices (PEMA's mixing λ) are made on the same valid.tsv prefix, never on test.
Everything generates in fp32 through pema.evaluation.translate_with: the same test rows, prompts,
batches, output cap and stop rule; each cell records the digest of what its decoder was asked,
and the report refuses to put a row whose digest differs into the table.

Each (task, method, seed) runs in its own process, so its peak RSS is its own; finished cells are
kept in results/compare.json (an interrupted run resumes), and compare.md / compare-<task>.png
are rendered from whatever is there, naming the cells still missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pema.argtypes import positive_int
from pema.errors import DataError, PemaError

RESULTS = Path(__file__).resolve().parent / "results"
DTYPE = "float32"  # every method generates and trains in this dtype


@dataclass(frozen=True)
class Method:
    label: str  # what the table shows: what ran
    kind: str  # copy | untuned | pema | peer
    adapter: dict[str, Any] = field(default_factory=dict)  # PEMA: AdapterConfig changes
    train: dict[str, Any] = field(default_factory=dict)  # PEMA: TrainConfig changes
    mixings: tuple[str, ...] = ()  # PEMA: candidates, chosen on the valid prefix
    memory_mode: str = "teacher-forced"
    peer: dict[str, Any] = field(default_factory=dict)  # peers: method and its settings
    seeded: bool = True


# DP rows of PEMA and JR-WARP: the same expected batch of pairs and the same epochs.
DP_BATCH = 64
# The paper's PEMA (Kim et al. 2024): two phases, κ 0.2, rank 512, raw keys, GU λ_max 0.9.
PAPER = dict(variant="faithful", rank=512, key_norm="raw", kappa=0.2, dropout=0.2)
PAPER_TRAIN = dict(rct_batch_size=20480, batch_size=2048)
METHODS: dict[str, Method] = {
    "copy": Method("copy the source", "copy", seeded=False),
    "untuned": Method("untuned model", "untuned", seeded=False),
    "pema": Method(
        "PEMA, shipped default (pema-tenant train: priors β, γ chosen on valid and fixed; the "
        "trained adapter kept only where it clearly beats its start on valid)",
        "pema",
    ),
    "pema-noprior": Method(
        "PEMA without source prior (the previous default: residual r 64, λ 0.25)",
        "pema",
        {"source_prior": 0.0},
    ),
    "prior-only": Method(
        "untuned model + source prior β 3 (no training)",
        "pema",
        {"source_prior": 3.0},
        {"epochs": 0},
        ("constant-1.0",),
        seeded=False,
    ),
    "pema-prior": Method(
        "PEMA + source prior β 3 fixed (residual r 64, λ 1; beyond the paper)",
        "pema",
        {"source_prior": 3.0},
        {"learn_source_prior": False},
        ("constant-1.0",),
    ),
    "copy-prior-only": Method(
        "untuned model + copy prior γ 4 (no training)",
        "pema",
        {"source_prior": 0.0, "copy_prior": 4.0},
        {"epochs": 0},
        ("constant-1.0",),
        seeded=False,
    ),
    "pema-copy": Method(
        "PEMA + copy prior γ 4 fixed, trained adapter always kept (residual r 64, λ 1)",
        "pema",
        {"source_prior": 0.0, "copy_prior": 4.0},
        {"learn_source_prior": False},
        ("constant-1.0",),
    ),
    "pema-paper": Method(
        "PEMA, paper recipe (faithful, κ 0.2, r 512, raw keys, GU 0.9)",
        "pema",
        PAPER,
        PAPER_TRAIN,
        ("gu-0.9",),
    ),
    "pema-paper-rms": Method(
        "PEMA, paper recipe on RMS-normalized keys",
        "pema",
        {**PAPER, "key_norm": "rms"},
        PAPER_TRAIN,
        ("gu-0.9",),
    ),
    "pema-fr": Method(
        "PEMA, shipped default, free-running memory (labels stay with the tenant)",
        "pema",
        memory_mode="free-running",
    ),
    # Where the gate keeps the prior alone, pema-fr cannot show what label privacy costs; without
    # priors the trained adapter is what ships, so this row against pema-noprior can.
    "pema-noprior-fr": Method(
        "PEMA without source prior, free-running memory (labels stay with the tenant)",
        "pema",
        {"source_prior": 0.0},
        memory_mode="free-running",
    ),
    "pema-mix": Method(
        "PEMA-mix (AdaMix on PEMA, M 4, consistency 100)",
        "pema",
        dict(mixture=4, mixture_consistency=100.0),
    ),
    "pema-dp8": Method(
        f"DP-PEMA ε 8 (Poisson batches of {DP_BATCH} pairs, lr 1e-2, β fixed)",
        "pema",
        dict(dropout=0.0),
        dict(dp_epsilon=8.0, dp_batch_pairs=DP_BATCH, lr=1e-2),
    ),
    "pema-dp3": Method(
        f"DP-PEMA ε 3 (Poisson batches of {DP_BATCH} pairs, lr 1e-2, β fixed)",
        "pema",
        dict(dropout=0.0),
        dict(dp_epsilon=3.0, dp_batch_pairs=DP_BATCH, lr=1e-2),
    ),
    "lora": Method("LoRA (r 8, α 16, q/v, all blocks)", "peer", peer=dict(method="lora")),
    "lora-top1": Method(
        "LoRA in the top block only (not offsite)", "peer", peer=dict(method="lora", top_layers=1)
    ),
    "lora-top2": Method(
        "LoRA in the top 2 blocks (not offsite)", "peer", peer=dict(method="lora", top_layers=2)
    ),
    "full": Method("full fine-tuning", "peer", peer=dict(method="full")),
    "adamix": Method(
        "AdaMix (LoRA M 4, consistency 100)", "peer", peer=dict(method="adamix", consistency=100.0)
    ),
    "slash": Method("SLaSh (k 1024)", "peer", peer=dict(method="slash")),
    "jrwarp": Method("JR-WARP (k 1024)", "peer", peer=dict(method="jrwarp")),
    "jrwarp-dp8": Method(
        f"DP-JR-WARP ε 8 (Poisson batches of {DP_BATCH} pairs, lr 1e-2)",
        "peer",
        peer=dict(method="jrwarp", dp_epsilon=8.0),
    ),
    "jrwarp-dp3": Method(
        f"DP-JR-WARP ε 3 (Poisson batches of {DP_BATCH} pairs, lr 1e-2)",
        "peer",
        peer=dict(method="jrwarp", dp_epsilon=3.0),
    ),
}
# The order cells run in: the core comparison first, so a cut-short run still has it.
CORE = [
    "copy",
    "untuned",
    "pema",
    "lora",
    "pema-noprior",
    "prior-only",
    "pema-prior",
    "copy-prior-only",
    "pema-copy",
]


@dataclass(frozen=True)
class Protocol:
    """The conditions every method of one task shares."""

    task: str
    train_pairs: int = 1000
    select_pairs: int = 60  # valid.tsv prefix: choices (λ) are made here
    stop_pairs: int = 100  # valid.tsv suffix: early stopping reads its loss here
    test_pairs: int = 200
    max_epochs: int = 2
    max_tokens: int = 160  # prompt + target per training row
    batch_size: int = 16  # generation
    dtype: str = DTYPE
    model: str = ""  # a local Hugging Face folder; "": the default model
    data: str = ""  # a folder with train/valid/test.tsv; "": ../shared/data/<task>


def _files(p: Protocol) -> dict[str, Path]:
    from pema.data import shared_data_dir

    folder = Path(p.data) if p.data else shared_data_dir() / p.task
    return {s: folder / f"{s}.tsv" for s in ("train", "valid", "test")}


@dataclass
class Rows:
    train: list[Any]
    select: list[Any]
    stop: list[Any]
    test: list[Any]


def rows(p: Protocol) -> Rows:
    from pema.data import read_pairs

    files = _files(p)
    valid = read_pairs(files["valid"])
    if len(valid) < p.select_pairs + p.stop_pairs:
        raise DataError(f"valid.tsv has {len(valid)} rows: the prefix and suffix would overlap")
    return Rows(
        read_pairs(files["train"], p.train_pairs),
        valid[: p.select_pairs],
        valid[-p.stop_pairs :],
        read_pairs(files["test"], p.test_pairs),
    )


def _setup_torch() -> None:
    import torch

    torch.set_num_threads(2)
    os.environ["PEMA_DTYPE"] = DTYPE


def _model_dir(p: Protocol) -> Path:
    from pema.models import resolve_model_dir

    return resolve_model_dir(p.model or None)


def _load_model(p: Protocol) -> tuple[Any, Any]:
    import torch

    from pema.models import load_causal_lm

    return load_causal_lm(_model_dir(p), getattr(torch, DTYPE))


def _frozen(p: Protocol) -> tuple[Any, Any]:
    """The frozen model as PEMA sees it (final norm lifted into the head), and its tokenizer."""
    from pema.backbone import FrozenLM
    from pema.models import DEFAULT_MODEL_NAME, model_revision

    model, tokenizer = _load_model(p)
    name = model_name(p) or DEFAULT_MODEL_NAME
    return FrozenLM(model, name, model_revision(_model_dir(p))), tokenizer


def _generate(decoder: Any, fmt: Any, pairs: list[Any], rho: float, p: Protocol) -> dict[str, Any]:
    from pema.evaluation import GenerationTrace, score, translate_with

    trace = GenerationTrace()
    start = time.perf_counter()
    hyps = translate_with(decoder, fmt, [x.source for x in pairs], rho, p.batch_size, trace=trace)
    return {
        **score(hyps, [x.target for x in pairs]),
        "outputs": hyps,
        "trace": trace.digest(),
        "seconds": round(time.perf_counter() - start, 1),
    }


def _rho(fmt: Any, pairs: list[Any]) -> float:
    from pema.generation import token_ratio

    return token_ratio(
        [len(fmt.text_ids(x.source)) for x in pairs], [len(fmt.target_ids(x.target)) for x in pairs]
    )


def _memory_path(p: Protocol, split: str, mode: str) -> Path:
    from pema.models import cache_dir

    model = model_name(p) or "default"
    name = f"{p.task}-{model}-n{p.train_pairs}-s{p.stop_pairs}-t{p.max_tokens}-{split}-{mode}"
    return cache_dir() / "compare" / name


def build_memory_cell(p: Protocol, mode: str) -> dict[str, Any]:
    """With the model: the memories of the training rows (in `mode`) and of the stop rows
    (teacher-forced, for early stopping), from the same cut rows the peers train on."""
    from pema.backbone import MemoryMode
    from pema.head import save_head
    from pema.memory import build_memory, memory_spec
    from pema.peers.sft import encode_pairs
    from pema.prompts import TASK_TEMPLATES, PromptFormat

    r = rows(p)
    lm, tokenizer = _frozen(p)
    fmt = PromptFormat(tokenizer, TASK_TEMPLATES[p.task])
    out: dict[str, Any] = {}
    for split, pairs, m in (("train", r.train, mode), ("stop", r.stop, "teacher-forced")):
        path = _memory_path(p, split, m)
        if path.is_file():
            continue
        start = time.perf_counter()
        spec = memory_spec(lm.info, pairs, fmt.template, MemoryMode(m))
        memory = build_memory(lm, encode_pairs(fmt, pairs, p.max_tokens), spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        memory.save(path)
        out[f"{split}_build_seconds"] = round(time.perf_counter() - start, 1)
        out[f"{split}_keys"] = len(memory)
    save_head(lm.head().spec, _memory_path(p, "head", "all"))
    return out


def ensure_memory(p: Protocol, mode: str) -> dict[str, Any]:
    """Build the memories in a process of their own (the model must not count in the training
    cell's peak RSS); nothing to do when they are on disk."""
    paths = [_memory_path(p, "train", mode), _memory_path(p, "stop", "teacher-forced")]
    if all(x.is_file() for x in paths) and _memory_path(p, "head", "all").is_file():
        return {}
    cmd = [sys.executable, "-m", "benchmarks.compare", "--cell", f"memory-{mode}:0",
           "--tasks", p.task, *protocol_flags(p)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory build failed:\n{proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def train_from_memories(
    p: Protocol,
    fmt: Any,
    adapter_settings: dict[str, Any],
    train_settings: dict[str, Any],
    memory_mode: str = "teacher-forced",
    seed: int = 0,
) -> tuple[Any, Any, Any, float]:
    """Train one adapter under the protocol's budget (epochs, validation at epoch ends on the
    stop rows, fp32 head) from the saved memories; returns the adapter, its training config,
    its report and ρ."""
    import torch

    from pema.adapter import AdapterConfig, PemaAdapter
    from pema.head import LMHead, load_head
    from pema.memory import Memory
    from pema.training import TrainConfig, train_adapter

    r = rows(p)
    rho = _rho(fmt, r.train)
    head = LMHead(load_head(_memory_path(p, "head", "all")))
    train_mem = Memory.load(_memory_path(p, "train", memory_mode))
    stop_mem = Memory.load(_memory_path(p, "stop", "teacher-forced"))
    config = AdapterConfig(
        hidden_size=head.hidden_size,
        rho=rho,
        template=fmt.template,
        memory_mode=memory_mode,
        **adapter_settings,
    )
    cfg = TrainConfig(
        **{
            "epochs": p.max_epochs,
            "rct_epochs": p.max_epochs,
            "eval_every": 10**9,  # validate at epoch ends only, as the peers do
            "seed": seed,
            "head_matmul_dtype": DTYPE,
            **train_settings,
        }
    )
    sources = (
        [fmt.prior_ids(x.source) for x in r.train],
        [fmt.prior_ids(x.source) for x in r.stop],
    )
    torch.manual_seed(seed)
    adapter = PemaAdapter(config)
    report = train_adapter(adapter, head, train_mem, stop_mem, cfg, sources=sources)
    return adapter, cfg, report, rho


def pema_settings(method: Method) -> dict[str, Any]:
    """The AdapterConfig settings of a PEMA row: the shipped defaults, changed by the method."""
    from tenant.cli import BEST

    return {
        **{k: BEST[k] for k in ("variant", "rank", "key_norm", "kappa", "alpha", "dropout")
           if k in BEST},
        "lambda_max": BEST["lambda_max"],
        "schedule": BEST["schedule"],
        **method.adapter,
    }  # fmt: skip


def chooses_prior(method: Method) -> bool:
    """The shipped default picks β on valid as `pema-tenant train` does; other rows set theirs."""
    from tenant.cli import BEST

    return "source_prior" not in method.adapter and BEST["source_prior"] == "auto"


# (β, γ) of the source priors whose teacher-forced CE the prior-choice cell also records.
CE_PRIORS = ((0.0, 0.0), (1.0, 0.0), (2.0, 0.0), (3.0, 0.0), (5.0, 0.0), (0.0, 2.0), (0.0, 4.0))


def prior_choice_cell(p: Protocol) -> dict[str, Any]:
    """With the model: the source priors `pema-tenant train` would choose for these rows (on the
    valid prefix, from the untrained adapter), and each (β, γ)'s chrF there; beside it, each of
    CE_PRIORS's teacher-forced CE on the stop rows, the cheaper criterion that was not chosen."""
    from pema.adapter import AdapterConfig, PemaAdapter
    from pema.evaluation import choose_source_prior
    from pema.head import LMHead, load_head
    from pema.memory import Memory
    from pema.prompts import TASK_TEMPLATES, PromptFormat
    from pema.settings import PriorChoice, prior_label
    from pema.training import evaluate_memory

    r = rows(p)
    lm, tokenizer = _frozen(p)
    fmt = PromptFormat(tokenizer, TASK_TEMPLATES[p.task])
    config = AdapterConfig(
        hidden_size=lm.info.hidden_size,
        rho=_rho(fmt, r.train),
        template=fmt.template,
        **pema_settings(METHODS["pema"]),
    )
    chosen, chrf = choose_source_prior(PriorChoice(), config, lm, fmt, r.select, p.batch_size)
    head = LMHead(load_head(_memory_path(p, "head", "all")))
    stop = Memory.load(_memory_path(p, "stop", "teacher-forced"))
    sources = [fmt.prior_ids(x.source) for x in r.stop]
    ce = {
        prior_label(b, g): round(
            evaluate_memory(
                PemaAdapter(config.replace(source_prior=b, copy_prior=g)),
                head,
                stop,
                sources=sources,
            )["ce"],
            4,
        )
        for b, g in CE_PRIORS
    }
    return {
        "source_prior": chosen.source_prior,
        "copy_prior": chosen.copy_prior,
        "lambda_max": chosen.lambda_max,
        "valid_chrf": {prior_label(*g): c for g, c in chrf.items()},
        "stop_ce": ce,
    }


def ensure_prior_choice(p: Protocol) -> dict[str, Any]:
    """`prior_choice_cell` in a process of its own (the model must not count in the training
    cell's peak RSS), once per protocol and choice grid: its result is kept beside the memories."""
    from pema.settings import PriorChoice

    grid = hashlib.sha256(repr(PriorChoice()).encode()).hexdigest()[:8]
    path = _memory_path(p, f"prior-choice-{grid}", "json")
    if not path.is_file():
        cmd = [sys.executable, "-m", "benchmarks.compare", "--cell", "prior-choice:0",
               "--tasks", p.task, *protocol_flags(p)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"prior choice failed:\n{proc.stderr[-2000:]}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(proc.stdout.strip().splitlines()[-1])
    return dict(json.loads(path.read_text()))


def pema_cell(
    p: Protocol, method: Method, seed: int, prior: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train from the saved memories holding only what a tenant holds (head, adapter, memory),
    read the peak RSS, then load the model to choose λ on the valid prefix and score test.
    `prior`: the source priors chosen on valid (`ensure_prior_choice`), kept fixed."""
    import torch
    from transformers import AutoTokenizer

    from pema.adapter import PemaAdapter
    from pema.evaluation import keep_if_better, pema_decoder
    from pema.generation import Mixing
    from pema.process import peak_rss_bytes
    from pema.prompts import TASK_TEMPLATES, PromptFormat
    from pema.settings import PriorChoice
    from tenant.cli import BEST

    r = rows(p)
    fmt = PromptFormat(AutoTokenizer.from_pretrained(_model_dir(p)), TASK_TEMPLATES[p.task])
    settings = pema_settings(method)
    train = {"lr": BEST["lr"], "batch_size": BEST["batch_size"], **method.train}
    if prior is not None:
        settings |= {k: prior[k] for k in ("source_prior", "copy_prior", "lambda_max")}
        train["learn_source_prior"] = False
    adapter, cfg, report, rho = train_from_memories(
        p, fmt, settings, train, method.memory_mode, seed
    )
    peak = peak_rss_bytes()
    trainable = sum(
        x.numel() for x in adapter.parameters() if x.requires_grad and x is not adapter.B_rct
    )
    lm, _ = _frozen(p)
    gate = None
    if prior is not None and prior["valid_chrf"]:
        # As `pema-tenant train` does: the trained adapter only if it clearly beats its start.
        torch.manual_seed(seed)  # train_from_memories' start: the same seed, the same init
        gate = keep_if_better(
            PriorChoice(),
            adapter,
            PemaAdapter(adapter.config).state_dict(),
            lm,
            fmt,
            r.select,
            p.batch_size,
        )
    mixings = method.mixings or (f"{BEST['schedule']}-{adapter.config.lambda_max}",)
    select = {
        m: _generate(pema_decoder(lm, adapter, Mixing.parse(m)), fmt, r.select, rho, p)
        for m in mixings
    }
    chosen = max(mixings, key=lambda m: select[m]["chrf"])
    test = _generate(pema_decoder(lm, adapter, Mixing.parse(chosen)), fmt, r.test, rho, p)
    phases = report.phases.values()
    last = report.phases[max(report.phases)]
    return {
        "epochs_run": sum(x.epochs_run for x in phases),
        "best_epoch": min(last.history, key=lambda h: h["loss"])["epoch"] if last.history else 0,
        "steps": sum(x.steps for x in phases),
        "train_seconds": round(report.seconds, 1),
        "peak_rss_mib": round(peak / 2**20, 1),
        "trainable_params": trainable,
        "served_params": sum(t.numel() for t in adapter.inference_state().values()),
        "privacy": report.privacy,
        "valid_memory": {k: round(v, 4) for k, v in report.valid.items()},
        "select": select,
        "chosen": chosen,
        "config": {"adapter": asdict(adapter.config), "train": asdict(cfg)},
        "source_prior_choice": prior,
        "valid_gate": gate,
        "test": test,
    }


def peer_cell(p: Protocol, method: Method, seed: int) -> dict[str, Any]:
    """Load the model in fp32, train the peer with early stopping on the stop rows, score."""
    import torch

    from pema.peers.cli import DEFAULT_LR
    from pema.peers.lora import DEFAULT_TARGETS, AdaMixPeer, full_peer, lora_peer
    from pema.peers.private import train_peer_private
    from pema.peers.sft import SFTConfig, encode_pairs, pad_id_of, peer_decoder, train_sft
    from pema.peers.shift import ShiftPeer
    from pema.process import peak_rss_bytes
    from pema.prompts import TASK_TEMPLATES, PromptFormat

    r = rows(p)
    torch.manual_seed(seed)
    model, tokenizer = _load_model(p)
    fmt = PromptFormat(tokenizer, TASK_TEMPLATES[p.task])
    rho = _rho(fmt, r.train)
    settings = dict(method.peer)
    name = settings.pop("method")
    dp_epsilon = settings.pop("dp_epsilon", None)
    peer: Any
    if name == "lora":
        peer = lora_peer(model, 8, 16, DEFAULT_TARGETS, top_layers=settings.get("top_layers"))
    elif name == "full":
        peer = full_peer(model)
    elif name == "adamix":
        peer = AdaMixPeer(model, 8, 16, DEFAULT_TARGETS, 4, settings["consistency"])
    else:
        peer = ShiftPeer(model, name, 1024, seed)
    batch = DP_BATCH if dp_epsilon is not None else 8
    cfg = SFTConfig(lr=DEFAULT_LR[name], batch_size=batch, epochs=p.max_epochs, seed=seed)
    pad = pad_id_of(fmt)
    items = encode_pairs(fmt, r.train, p.max_tokens)
    if dp_epsilon is not None:
        # DP accounting is for a fixed number of steps: no early stopping (stated in the report).
        report = train_peer_private(peer, items, cfg, pad, dp_epsilon)
    else:
        report = train_sft(
            peer, items, cfg, pad, valid_items=encode_pairs(fmt, r.stop, p.max_tokens)
        )
    peak = peak_rss_bytes()
    trainable = sum(x.numel() for x in peer.trainable())
    peer.prepare_inference()
    decoder = peer_decoder(peer, pad)
    select = _generate(decoder, fmt, r.select, rho, p)
    test = _generate(decoder, fmt, r.test, rho, p)
    return {
        "epochs_run": report.epochs_run or p.max_epochs,
        "best_epoch": report.best_epoch,
        "valid_history": report.valid_history,
        "steps": report.steps,
        "train_seconds": round(report.seconds, 1),
        "peak_rss_mib": round(peak / 2**20, 1),
        "trainable_params": trainable,
        "served_params": peer.inference_parameter_count(),
        "privacy": report.privacy,
        "select": {"-": select},
        "config": {"lr": cfg.lr, "batch_size": cfg.batch_size, **method.peer},
        "test": test,
    }


def baseline_cell(p: Protocol, method: Method) -> dict[str, Any]:
    from pema.evaluation import pema_decoder, score

    r = rows(p)
    if method.kind == "copy":
        copied = {
            split: {**score([x.source for x in got], [x.target for x in got])}
            for split, got in (("select", r.select), ("test", r.test))
        }
        return {
            "select": {"-": copied["select"]},
            "test": {**copied["test"], "outputs": [x.source for x in r.test]},
        }
    from pema.prompts import TASK_TEMPLATES, PromptFormat

    lm, tokenizer = _frozen(p)
    fmt = PromptFormat(tokenizer, TASK_TEMPLATES[p.task])
    rho = _rho(fmt, r.train)
    select = _generate(pema_decoder(lm), fmt, r.select, rho, p)
    return {
        "select": {"-": select},
        "test": _generate(pema_decoder(lm), fmt, r.test, rho, p),
    }


def run_cell(p: Protocol, method_name: str, seed: int) -> dict[str, Any]:
    _setup_torch()
    if method_name.startswith("memory-"):
        return build_memory_cell(p, method_name.removeprefix("memory-"))
    if method_name == "prior-choice":
        return prior_choice_cell(p)
    method = METHODS[method_name]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    if method.kind == "pema":
        build = ensure_memory(p, method.memory_mode)
        prior = ensure_prior_choice(p) if chooses_prior(method) else None
        out = pema_cell(p, method, seed, prior)
        out["memory_build"] = build
    elif method.kind == "peer":
        out = peer_cell(p, method, seed)
    else:
        out = baseline_cell(p, method)
    return {
        "method": method_name,
        "label": method.label,
        "seed": seed,
        **out,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "load_average": [round(load, 1), round(os.getloadavg()[0], 1)],
    }


def model_name(p: Protocol) -> str:
    """The protocol's model by its folder's name; "" for the default model."""
    return Path(p.model).name if p.model else ""


def model_task(p: Protocol) -> str:
    """The task's name, and the model's where it is not the default (kjv_web-gemma-3-270m)."""
    return "-".join(x for x in (p.task, model_name(p)) if x)


def task_key(p: Protocol) -> str:
    """compare.json's entry for a protocol: model_task at the default training pairs and
    epochs; learning-curve points sit beside it (kjv_web-n5000-e1: 5,000 pairs, 1 epoch)."""
    d = Protocol(p.task)
    changed = (("n", p.train_pairs, d.train_pairs), ("e", p.max_epochs, d.max_epochs))
    return model_task(p) + "".join(f"-{tag}{v}" for tag, v, default in changed if v != default)


class Store:
    """compare.json: the protocol of each task and its finished cells; rewritten after each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.doc: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def task(self, p: Protocol) -> dict[str, Any]:
        key = task_key(p)
        entry = self.doc.setdefault(key, {"protocol": asdict(p), "cells": {}})
        # Fields added to Protocol later read as their defaults in older files.
        entry["protocol"] = {**asdict(Protocol(p.task)), **entry["protocol"]}
        if entry["protocol"] != asdict(p):
            # Cells cost hours here: a run under other conditions must not overwrite them.
            old, new = entry["protocol"], asdict(p)
            # Over both key sets: a field since removed from Protocol is a difference too.
            diff = ", ".join(
                f"{k} {old.get(k)!r} -> {new.get(k)!r}"
                for k in {**old, **new}
                if old.get(k) != new.get(k)
            )
            raise PemaError(
                f"{self.path}: entry {key!r} holds {len(entry['cells'])} cells run under another "
                f"protocol ({diff}); pass --results to write elsewhere"
            )
        return entry

    def save(self) -> None:
        """Write, keeping cells another run added to the file meanwhile (the file's copy of a
        cell wins: this run only adds cells it finished)."""
        from pema.files import atomic_file

        disk = json.loads(self.path.read_text()) if self.path.is_file() else {}
        for task, entry in disk.items():
            mine = self.doc.get(task)
            if task == "machine":
                continue
            if mine is None:
                self.doc[task] = entry
            elif mine["protocol"] == entry["protocol"]:
                mine["cells"] = {**mine["cells"], **entry["cells"]}
        self.doc["machine"] = machine()
        with atomic_file(self.path) as tmp:
            tmp.write_text(json.dumps(self.doc, indent=1, ensure_ascii=False) + "\n")


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": 2, "dtype": DTYPE}


def cell_key(method: str, seed: int) -> str:
    return f"{method}/seed{seed}" if METHODS[method].seeded else method


def plan(methods: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """Every method's first seed (core methods first), then the further seeds."""
    ordered = [m for m in CORE if m in methods] + [m for m in methods if m not in CORE]
    first = [(m, seeds[0]) for m in ordered]
    more = [(m, s) for s in seeds[1:] for m in ordered if METHODS[m].seeded]
    return first + more


def run_all(args: argparse.Namespace) -> None:
    store = Store(args.results)
    for task in args.tasks:
        p = protocol_from(args, task)
        entry = store.task(p)
        for method, seed in plan(args.methods, args.seeds):
            key = cell_key(method, seed)
            if key in entry["cells"]:
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {task} {key} ...", file=sys.stderr, flush=True)
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.compare",
                "--cell",
                f"{method}:{seed}",
                "--tasks",
                task,
                *protocol_flags(p),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"  failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            entry["cells"][key] = json.loads(proc.stdout.strip().splitlines()[-1])
            store.save()
            from benchmarks.compare_report import write_report

            write_report(store.doc, args.results.parent)


PROTOCOL_FLAGS = (
    "model",
    "data",
    "train_pairs",
    "select_pairs",
    "stop_pairs",
    "test_pairs",
    "max_epochs",
    "max_tokens",
    "batch_size",
)


def protocol_from(args: argparse.Namespace, task: str) -> Protocol:
    return Protocol(task, **{k: getattr(args, k) for k in PROTOCOL_FLAGS})


def protocol_flags(p: Protocol) -> list[str]:
    return [f"--{k.replace('_', '-')}={getattr(p, k)}" for k in PROTOCOL_FLAGS]


def build_parser() -> argparse.ArgumentParser:
    d = Protocol("-")
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        default=["kjv_web", "web_es"],
        choices=["kjv_web", "web_es"],
        help="tasks (default: %(default)s)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=list(METHODS),
        help="methods (default: all)",
    )
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0, 1],
        help="seeds of trained methods (default: %(default)s)",
    )
    helps = {
        "train_pairs": "first N training pairs, for every method",
        "select_pairs": "valid.tsv prefix on which choices are made",
        "stop_pairs": "valid.tsv suffix on which early stopping reads its loss",
        "test_pairs": "first N test pairs, scored",
        "max_epochs": "epochs at most, for every trained method",
        "max_tokens": "prompt + target tokens per training row",
        "batch_size": "generation batch",
    }
    p.add_argument(
        "--model",
        default="",
        help="local Hugging Face model folder, or a model name: gemma-3-270m (opt-in, `make "
        "gemma`) (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--data", default="", help="folder of train/valid/test.tsv (default: ../shared/data/<task>)"
    )
    for k in PROTOCOL_FLAGS[2:]:
        p.add_argument(
            f"--{k.replace('_', '-')}",
            type=positive_int,
            default=getattr(d, k),
            help=f"{helps[k]} (default: %(default)s)",
        )
    p.add_argument(
        "--results",
        type=Path,
        default=RESULTS / "compare.json",
        help="cells file (default: %(default)s)",
    )
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: METHOD:SEED
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cell:
        method, _, seed = args.cell.partition(":")
        print(
            json.dumps(
                run_cell(protocol_from(args, args.tasks[0]), method, int(seed)), ensure_ascii=False
            )
        )
        return 0
    args.results.parent.mkdir(parents=True, exist_ok=True)
    try:
        run_all(args)
    except PemaError as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
