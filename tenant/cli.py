"""`pema-tenant`: train, evaluate and generate with a PEMA adapter."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from pema.adapter import KEY_NORMS, SCHEDULES, VARIANTS, AdapterConfig
from pema.argtypes import positive_int
from pema.backbone import MemoryMode
from pema.data import read_pairs
from pema.dtypes import resolve_device
from pema.errors import PemaError
from pema.evaluation import translate
from pema.generation import Mixing
from pema.models import cache_dir
from pema.prompts import DEFAULT_TEMPLATE, PromptFormat
from pema.training import TrainConfig
from tenant.backend import Backend, coordinator_backend, local_backend
from tenant.coordinator_client import TlsOptions
from tenant.jobs import evaluate_job, load_job_adapter, train_job
from tenant.memory_store import DiskMemoryStore

# The defaults are the best configuration found on valid.tsv (benchmarks/results/quality.md); the
# mixing is the one whose worst valid chrF gain over the untuned model across tasks is largest.
BEST = {
    "variant": "residual",
    "key_norm": "rms",
    "rank": 64,
    "kappa": 0.0,
    "lambda_max": 0.25,
    "schedule": "constant",
    "memory_mode": "teacher-forced",
    "lr": 1e-3,
    "batch_size": 256,
    "epochs": 8,
}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="local Hugging Face causal-LM folder (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument(
        "--device",
        default=None,
        help="where the in-process model runs: auto, cpu or cuda[:N] "
        "(default: $PEMA_DEVICE, else auto: CUDA when present)",
    )
    p.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        default=None,
        help="use the frozen model behind this coordinator instead of loading it here",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("PEMA_TOKEN"),
        help="the tenant's coordinator token (default: $PEMA_TOKEN)",
    )
    p.add_argument(
        "--tls-ca", type=Path, default=None, help="CA that signed the coordinator's cert"
    )
    p.add_argument("--tls-cert", type=Path, default=None, help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, default=None, help="client key (mutual TLS)")


def _backend(args: argparse.Namespace) -> Backend:
    """The coordinator's model when --coordinator is given, else the model in this process."""
    if args.coordinator is None:
        return local_backend(args.model, device=resolve_device(args.device))
    if args.model is not None or args.device is not None:
        raise PemaError("--model and --device exclude --coordinator (the model runs there)")
    if not args.token:
        raise PemaError("--coordinator needs --token (or PEMA_TOKEN)")
    use_tls = args.tls_ca or args.tls_cert or args.tls_key
    tls = TlsOptions(args.tls_ca, args.tls_cert, args.tls_key) if use_tls else None
    return coordinator_backend(args.coordinator, args.token, tls)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pema-tenant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="build the external memory and train an adapter")
    t.add_argument("--train", type=Path, required=True, help="TSV with source and target columns")
    t.add_argument("--valid", type=Path, required=True, help="TSV for early stopping")
    t.add_argument("--out", type=Path, required=True, help="adapter folder to write")
    _add_model_args(t)
    t.add_argument(
        "--template", default=DEFAULT_TEMPLATE, help="task prompt with a {source} placeholder"
    )
    t.add_argument(
        "--max-pairs", type=positive_int, default=None, help="use the first N training pairs"
    )
    t.add_argument("--max-valid-pairs", type=positive_int, default=200)
    t.add_argument(
        "--memory-mode", choices=[m.value for m in MemoryMode], default=BEST["memory_mode"]
    )
    t.add_argument("--variant", choices=VARIANTS, default=BEST["variant"])
    t.add_argument("--key-norm", choices=KEY_NORMS, default=BEST["key_norm"])
    t.add_argument("--rank", type=positive_int, default=BEST["rank"])
    t.add_argument("--alpha", type=float, default=1.0)
    t.add_argument("--dropout", type=float, default=0.2)
    t.add_argument(
        "--kappa",
        type=float,
        default=BEST["kappa"],
        help="weight of reconstruction in phase 2; 0 skips phase 1",
    )
    t.add_argument("--lambda-max", type=float, default=BEST["lambda_max"])
    t.add_argument("--schedule", choices=SCHEDULES, default=BEST["schedule"])
    t.add_argument("--lr", type=float, default=BEST["lr"])
    t.add_argument("--batch-size", type=positive_int, default=BEST["batch_size"])
    t.add_argument("--rct-batch-size", type=positive_int, default=20480)
    t.add_argument("--epochs", type=int, default=BEST["epochs"])
    t.add_argument("--rct-epochs", type=int, default=5)
    t.add_argument("--eval-every", type=positive_int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--adapter",
        choices=["pema", "pema-mix"],
        default="pema",
        help="pema-mix: AdaMix on PEMA (M copies of A, averaged at inference)",
    )
    t.add_argument("--mixture", type=positive_int, default=4, help="copies M for pema-mix")
    t.add_argument(
        "--dp-epsilon",
        type=float,
        default=None,
        help="DP-SGD to this ε at δ = 1/(2N), N = training pairs (privacy unit: one pair); "
        "implies no dropout and no early stopping",
    )
    t.add_argument("--dp-max-grad-norm", type=float, default=1.0, help="DP clipping bound C")
    t.add_argument("--dp-batch-pairs", type=positive_int, default=32)
    t.add_argument("--tenant", default="local", help="namespace in the memory cache")
    t.add_argument(
        "--no-cache", action="store_true", help="do not read or write the on-disk memory cache"
    )
    t.add_argument("--quiet", action="store_true")

    e = sub.add_parser("evaluate", help="BLEU/chrF of the untuned model and of the adapter")
    e.add_argument("--adapter", type=Path, required=True)
    e.add_argument("--test", type=Path, required=True)
    _add_model_args(e)
    e.add_argument("--limit", type=positive_int, default=None, help="use the first N test pairs")
    e.add_argument("--lambda-max", type=float, default=None, help="override the adapter's λ_max")
    e.add_argument(
        "--schedule", choices=SCHEDULES, default=None, help="override the adapter's schedule"
    )
    e.add_argument("--batch-size", type=positive_int, default=16)
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    e.add_argument("--quiet", action="store_true")

    g = sub.add_parser("generate", help="generate with an adapter")
    g.add_argument("--adapter", type=Path, required=True)
    _add_model_args(g)
    g.add_argument("text", nargs="+")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    train_pairs = read_pairs(args.train, args.max_pairs)
    valid_pairs = read_pairs(args.valid, args.max_valid_pairs)
    adapter_config = AdapterConfig(
        hidden_size=1,  # set from the model by train_job
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        variant=args.variant,
        key_norm=args.key_norm,
        kappa=args.kappa,
        lambda_max=args.lambda_max,
        schedule=args.schedule,
        template=args.template,
        memory_mode=args.memory_mode,
        mixture=args.mixture if args.adapter == "pema-mix" else 1,
    )
    if args.dp_epsilon is not None:
        # Opacus replays the adapter per sample, where a fresh dropout mask would be drawn.
        adapter_config = adapter_config.replace(dropout=0.0)
    train_config = TrainConfig(
        lr=args.lr,
        batch_size=args.batch_size,
        rct_batch_size=args.rct_batch_size,
        epochs=args.epochs,
        rct_epochs=args.rct_epochs,
        eval_every=args.eval_every,
        seed=args.seed,
        dp_epsilon=args.dp_epsilon,
        dp_max_grad_norm=args.dp_max_grad_norm,
        dp_batch_pairs=args.dp_batch_pairs,
    )
    if args.out.exists() and not args.out.is_dir():
        raise PemaError(f"{args.out}: exists and is not a folder")
    backend = _backend(args)
    store = None if args.no_cache else DiskMemoryStore(cache_dir() / "memories")
    outcome = train_job(
        backend,
        train_pairs,
        valid_pairs,
        adapter_config,
        train_config,
        args.out,
        store,
        args.tenant,
        args.quiet,
    )
    s = outcome.summary
    print(
        f"adapter written to {args.out}: {s['train_keys']} keys, valid top-1 {s['valid']['top1']:.3f} "
        f"(model alone {s['valid']['model_top1']:.3f}), train {s['train_seconds']} s, "
        f"memory {s['memory_build_seconds']} s{' (cached)' if s['memory_cache_hit'] else ''}"
    )
    privacy = outcome.report.privacy
    if privacy is not None:
        print(
            f"DP-SGD per {privacy['unit']}: ε spent {privacy['epsilon_spent']} at δ "
            f"{privacy['target_delta']:.2e} (noise multiplier {privacy['noise_multiplier']}, "
            f"C {privacy['max_grad_norm']}, {privacy['steps']} steps)"
        )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    pairs = read_pairs(args.test, args.limit)
    backend = _backend(args)
    adapter = load_job_adapter(backend, args.adapter)
    cfg = adapter.config
    mixing = Mixing(
        args.lambda_max if args.lambda_max is not None else cfg.lambda_max,
        args.schedule or cfg.schedule,
    )
    result = evaluate_job(
        backend, adapter, pairs, mixing, batch_size=args.batch_size, quiet=args.quiet
    )
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(f"pairs: {result['n']}  mixing: {mixing.schedule} λ_max {mixing.lambda_max}")
        print(
            f"untuned model   BLEU {result['zero_shot_bleu']:6.2f}  chrF {result['zero_shot_chrf']:6.2f}"
        )
        print(f"PEMA adapter    BLEU {result['bleu']:6.2f}  chrF {result['chrf']:6.2f}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    backend = _backend(args)
    adapter = load_job_adapter(backend, args.adapter)
    cfg = adapter.config
    fmt = PromptFormat(backend.tokenizer, cfg.template)
    outputs = translate(
        backend.backbone, fmt, args.text, adapter, Mixing(cfg.lambda_max, cfg.schedule), cfg.rho
    )
    for text in outputs:
        print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    commands = {"train": cmd_train, "evaluate": cmd_evaluate, "generate": cmd_generate}
    try:
        return commands[args.command](args)
    except PemaError as e:
        print(f"pema-tenant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pema-tenant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
