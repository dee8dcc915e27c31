"""`pema-tenant`: train, evaluate and generate with a PEMA adapter."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Only light modules here: arguments are parsed and checked before torch and transformers load
# (seconds), so --help and every usage error answer at once.
from pema.argtypes import (
    add_subparsers,
    auto_or,
    new_parser,
    non_empty_text,
    non_negative_float,
    positive_int,
)
from pema.data import read_pairs
from pema.errors import PemaError
from pema.settings import (
    ADAPTER_CONFIG,
    DEFAULT_TEMPLATE,
    KEY_NORMS,
    LEGACY_ADAPTER_FILES,
    SCHEDULES,
    VARIANTS,
    MemoryMode,
    PriorChoice,
    cache_dir,
    prior_label,
)

if TYPE_CHECKING:
    from tenant.backend import Backend

# The defaults were chosen on valid.tsv across both tasks (benchmarks/results/compare.md): the
# source priors (β, γ) are chosen per tenant on its own valid pairs (PriorChoice), which turns the
# copy prior on for kjv_web and both off for web_es; λ is 0.25 without a prior and 1 with one;
# the trained adapter is kept only where it clearly beats that start on the same valid pairs
# (paired-bootstrap interval above 0).
BEST: dict[str, Any] = {
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
    "source_prior": "auto",
    "copy_prior": "auto",
}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="local Hugging Face causal-LM folder, or a model name: gemma-3-270m "
        "(opt-in, Gemma terms; `make gemma`) (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)"
    )
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
    # No env default here: the help would print the secret.
    p.add_argument(
        "--token", default=None, help="the tenant's coordinator token (default: $PEMA_TOKEN)"
    )
    p.add_argument(
        "--tls-ca",
        type=Path,
        default=None,
        help="PEM CA that signed the coordinator's certificate: connect over TLS "
        "(default: none, plaintext unless --tls-cert is given; then the system's CAs)",
    )
    p.add_argument(
        "--tls-cert",
        type=Path,
        default=None,
        help="PEM client certificate for mutual TLS (default: none)",
    )
    p.add_argument(
        "--tls-key", type=Path, default=None, help="PEM key of --tls-cert (default: none)"
    )
    p.add_argument(
        "--coordinator-retry-seconds",
        type=non_negative_float,
        default=120.0,
        help="keep retrying an unavailable coordinator (a restart) this long; 0: fail at once",
    )


def _backend(args: argparse.Namespace) -> Backend:
    """The coordinator's model when --coordinator is given, else the model in this process."""
    from pema.dtypes import resolve_device
    from tenant.backend import coordinator_backend, local_backend
    from tenant.coordinator_client import TlsOptions

    if args.coordinator is None:
        return local_backend(args.model, device=resolve_device(args.device))
    if args.model is not None or args.device is not None:
        raise PemaError("--model and --device exclude --coordinator (the model runs there)")
    token = args.token or os.environ.get("PEMA_TOKEN")
    if not token:
        raise PemaError("--coordinator needs --token (or PEMA_TOKEN)")
    tls = TlsOptions.named(args.tls_ca, args.tls_cert, args.tls_key)
    return coordinator_backend(
        args.coordinator, token, tls, retry_seconds=args.coordinator_retry_seconds
    )


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("pema-tenant", __doc__)
    sub = add_subparsers(parser)

    t = sub.add_parser(
        "train",
        help="build the external memory and train an adapter",
        description="Build (or load from the cache) the external memory and train a PEMA "
        "adapter. The defaults are the configuration chosen on valid.tsv.",
    )
    t.add_argument("--train", type=Path, required=True, help="TSV with source and target columns")
    t.add_argument("--valid", type=Path, required=True, help="TSV for early stopping")
    t.add_argument("--out", type=Path, required=True, help="adapter folder to write")
    t.add_argument("--force", action="store_true", help="replace an adapter already in --out")
    _add_model_args(t)
    t.add_argument(
        "--template", default=DEFAULT_TEMPLATE, help="task prompt with a {source} placeholder"
    )
    t.add_argument(
        "--max-pairs",
        type=positive_int,
        default=None,
        help="use the first N training pairs (default: all)",
    )
    t.add_argument(
        "--max-valid-pairs", type=positive_int, default=200, help="use the first N valid pairs"
    )
    t.add_argument(
        "--memory-mode",
        choices=[m.value for m in MemoryMode],
        default=BEST["memory_mode"],
        help="keys from gold prefixes (teacher-forced) or from the model's own outputs",
    )
    t.add_argument(
        "--variant",
        choices=VARIANTS,
        default=BEST["variant"],
        help="residual: h = n(f) + B z, starting at the model's distribution; faithful: the paper's",
    )
    t.add_argument(
        "--key-norm", choices=KEY_NORMS, default=BEST["key_norm"], help="key normalization"
    )
    t.add_argument("--rank", type=positive_int, default=BEST["rank"], help="bottleneck rank r")
    t.add_argument("--alpha", type=float, default=1.0, help="scaling α (the update is α/r)")
    t.add_argument("--dropout", type=float, default=0.2, help="dropout on the keys")
    t.add_argument(
        "--kappa",
        type=float,
        default=BEST["kappa"],
        help="weight of reconstruction in phase 2; 0 skips phase 1",
    )
    t.add_argument(
        "--lambda-max",
        type=auto_or(float),
        default="auto",
        help="weight of the adapter's distribution when mixing; auto: "
        f"{BEST['lambda_max']} without a source prior, {PriorChoice.lambda_with_prior} with one",
    )
    t.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=BEST["schedule"],
        help="mixing: constant λ, or Gradual Unrolling (gu)",
    )
    t.add_argument(
        "--source-prior",
        type=auto_or(non_negative_float),
        default=BEST["source_prior"],
        help="β of the bag prior in P_PEMA: boosts the tokens of each row's own source text "
        "(good for rewriting tasks; 0 turns it off; beyond the paper, see README); auto: "
        "chosen with --copy-prior's γ, the (β, γ) of "
        f"{[tuple(g) for g in PriorChoice.grid]} whose untrained outputs score best (chrF) on "
        f"the first {PriorChoice.pairs} valid pairs, before training",
    )
    t.add_argument(
        "--copy-prior",
        type=auto_or(non_negative_float),
        default=BEST["copy_prior"],
        help="γ of the copy prior in P_PEMA: boosts the source token that continues copying "
        "from where the output stands in its source (0 turns it off; beyond the paper); auto: "
        "chosen with --source-prior (both auto or neither)",
    )
    t.add_argument(
        "--fixed-source-prior",
        action="store_true",
        help="keep β and γ at their starts instead of learning them (priors chosen by auto are "
        "kept)",
    )
    t.add_argument("--lr", type=float, default=BEST["lr"], help="learning rate")
    t.add_argument(
        "--batch-size", type=positive_int, default=BEST["batch_size"], help="keys per step"
    )
    t.add_argument(
        "--rct-batch-size",
        type=positive_int,
        default=20480,
        help="keys per step in phase 1 (reconstruction)",
    )
    t.add_argument(
        "--epochs", type=positive_int, default=BEST["epochs"], help="phase-2 epochs (at most)"
    )
    t.add_argument(
        "--rct-epochs",
        type=positive_int,
        default=5,
        help="phase-1 epochs (skipped when --kappa is 0)",
    )
    t.add_argument("--eval-every", type=positive_int, default=100, help="validate every N steps")
    t.add_argument("--seed", type=int, default=0, help="random seed")
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
        "implies no dropout and no early stopping (default: no DP)",
    )
    t.add_argument("--dp-max-grad-norm", type=float, default=1.0, help="DP clipping bound C")
    t.add_argument("--dp-batch-pairs", type=positive_int, default=32, help="pairs per DP-SGD step")
    t.add_argument("--tenant", default="local", help="namespace in the memory cache")
    t.add_argument(
        "--no-cache", action="store_true", help="do not read or write the on-disk memory cache"
    )
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser("evaluate", help="BLEU/chrF of the untuned model and of the adapter")
    e.add_argument("--adapter", type=Path, required=True, help="adapter folder")
    e.add_argument("--test", type=Path, required=True, help="TSV with source and target columns")
    _add_model_args(e)
    e.add_argument(
        "--limit", type=positive_int, default=None, help="use the first N test pairs (default: all)"
    )
    e.add_argument("--lambda-max", type=float, default=None, help="override the adapter's λ_max")
    e.add_argument(
        "--schedule", choices=SCHEDULES, default=None, help="override the adapter's schedule"
    )
    e.add_argument("--batch-size", type=positive_int, default=16, help="sequences per batch")
    e.add_argument(
        "--no-untuned",
        action="store_true",
        help="skip the untuned model's baseline (half the time)",
    )
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    e.add_argument("--quiet", action="store_true", help="no progress bars")

    g = sub.add_parser("generate", help="generate with an adapter, one output line per text")
    g.add_argument("--adapter", type=Path, required=True, help="adapter folder")
    _add_model_args(g)
    g.add_argument("text", nargs="+", type=non_empty_text, help="source texts")

    a = sub.add_parser("adapters", help="list, show or delete saved adapters")
    asub = a.add_subparsers(dest="action", required=True)
    al = asub.add_parser("list", help="the adapters in folders (and their subfolders)")
    al.add_argument("roots", nargs="*", type=Path, default=[Path(".")], help="folders to search")
    ash = asub.add_parser("show", help="an adapter's config, training summary and tensors")
    ash.add_argument("path", type=Path, help="adapter folder")
    ad = asub.add_parser("delete", help="delete adapter folders")
    ad.add_argument("paths", nargs="+", type=Path, help="adapter folders")

    w = sub.add_parser(
        "worker",
        help="serve the tenant's Flower ClientApp steps from one long-lived process",
        description="Run train and evaluate steps for the tenant's ClientApp (node config "
        "`worker-socket` = --socket) with torch, the model's head and tokenizer and the memories "
        "kept loaded between rounds. Serves until SIGTERM or Ctrl-C; one step at a time.",
    )
    w.add_argument(
        "--socket",
        type=Path,
        required=True,
        help="Unix socket to serve on (required); its folder is created private (0700), or "
        "must be, and the key the ClientApp authenticates with is written next to it",
    )
    w.add_argument(
        "--memory-slots",
        type=positive_int,
        default=4,
        help="memories kept in RAM between steps, the most recently used (a tenant uses two)",
    )

    c = sub.add_parser("cache", help="list or clear cached memories (disk and Redis)")
    csub = c.add_subparsers(dest="action", required=True)
    for name, helptext in (
        ("list", "cached memories: what each was built from, pairs, keys, size"),
        ("clear", "delete cached memories (all, or one tenant's, or one address)"),
    ):
        cp = csub.add_parser(name, help=helptext)
        cp.add_argument(
            "--redis-url",
            default=None,
            help="also the Redis cache at this URL (default: the disk cache only)",
        )
        cp.add_argument("--tenant", default=None, help="only this tenant's memories")
        if name == "clear":
            cp.add_argument("--address", default=None, help="only the memory with this address")
        else:
            cp.add_argument("--json", action="store_true", help="one JSON object per line")
    return parser


def _check_out(args: argparse.Namespace) -> None:
    """--out may name a new folder, or (with --force) an adapter folder to replace."""
    out: Path = args.out
    if not out.exists():
        return
    if not out.is_dir():
        raise PemaError(f"{out}: exists and is not a folder")
    holds_adapter = any((out / n).is_file() for n in (ADAPTER_CONFIG, *LEGACY_ADAPTER_FILES))
    if not any(out.iterdir()):
        return
    if not holds_adapter:
        raise PemaError(f"{out}: a folder that holds no adapter; refusing to replace it")
    if not args.force:
        raise PemaError(f"{out}: an adapter is already there (pass --force to replace it)")


def cmd_train(args: argparse.Namespace) -> int:
    if (args.source_prior == "auto") != (args.copy_prior == "auto"):
        raise PemaError(
            "--source-prior and --copy-prior are chosen together: auto for both, or a value for each"
        )
    _check_out(args)
    train_pairs = read_pairs(args.train, args.max_pairs)
    valid_pairs = read_pairs(args.valid, args.max_valid_pairs)
    from pema.adapter import AdapterConfig
    from pema.training import TrainConfig
    from tenant.jobs import train_job
    from tenant.memory_store import DiskMemoryStore

    adapter_config = AdapterConfig(
        hidden_size=1,  # set from the model by train_job
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        variant=args.variant,
        key_norm=args.key_norm,
        kappa=args.kappa,
        lambda_max=float(BEST["lambda_max"] if args.lambda_max == "auto" else args.lambda_max),
        schedule=args.schedule,
        template=args.template,
        memory_mode=args.memory_mode,
        mixture=args.mixture if args.adapter == "pema-mix" else 1,
        source_prior=0.0 if args.source_prior == "auto" else args.source_prior,
        copy_prior=0.0 if args.copy_prior == "auto" else args.copy_prior,
    )
    prior_choice = None
    if args.source_prior == "auto":
        with_prior = PriorChoice.lambda_with_prior if args.lambda_max == "auto" else args.lambda_max
        prior_choice = PriorChoice(lambda_with_prior=with_prior)
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
        # A β chosen on valid stays as chosen.
        learn_source_prior=not args.fixed_source_prior and args.source_prior != "auto",
    )
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
        prior_choice=prior_choice,
    )
    s = outcome.summary
    print(
        f"adapter written to {args.out}: {s['train_keys']} keys, valid top-1 {s['valid']['top1']:.3f} "
        f"(model alone {s['valid']['model_top1']:.3f}), train {s['train_seconds']} s, "
        f"memory {s['memory_build_seconds']} s{' (cached)' if s['memory_cache_hit'] else ''}"
    )
    if prior_choice is not None:
        cfg = outcome.adapter.config
        chrf = ", ".join(f"{g}: {c:.1f}" for g, c in s["source_prior_valid_chrf"].items())
        print(
            f"source priors chosen on valid: {prior_label(cfg.source_prior, cfg.copy_prior)}, "
            f"λ {cfg.lambda_max:g} "
            f"(chrF {chrf})"
            if chrf
            else "source priors off: no valid pair leaves room for its output in the model's limit"
        )
        if "kept" in s:
            chrf = s["valid_chrf"]
            print(
                f"valid chrF: trained {chrf['trained']:.1f}, start {chrf['start']:.1f} "
                f"(difference 95% interval [{chrf['interval'][0]:+.1f}, "
                f"{chrf['interval'][1]:+.1f}]): "
                + (
                    "the trained adapter is kept"
                    if s["kept"] == "trained"
                    else "training did not clearly pay on valid, the start (priors, no training) "
                    "is kept"
                )
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
    from pema.generation import Mixing
    from tenant.jobs import evaluate_job, load_job_adapter

    backend = _backend(args)
    adapter = load_job_adapter(backend, args.adapter)
    cfg = adapter.config
    mixing = Mixing(
        args.lambda_max if args.lambda_max is not None else cfg.lambda_max,
        args.schedule or cfg.schedule,
    )
    result = evaluate_job(
        backend,
        adapter,
        pairs,
        mixing,
        include_untuned=not args.no_untuned,
        batch_size=args.batch_size,
        quiet=args.quiet,
    )
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(f"pairs: {result['n']}  mixing: {mixing.schedule} λ_max {mixing.lambda_max}")
        if "untuned_bleu" in result:
            print(
                f"untuned model   BLEU {result['untuned_bleu']:6.2f}  "
                f"chrF {result['untuned_chrf']:6.2f}"
            )
        print(f"PEMA adapter    BLEU {result['bleu']:6.2f}  chrF {result['chrf']:6.2f}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pema.evaluation import translate
    from pema.generation import Mixing
    from pema.prompts import PromptFormat
    from tenant.jobs import load_job_adapter

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


def cmd_adapters(args: argparse.Namespace) -> int:
    from tenant.inventory import delete_adapters, list_adapters, show_adapter

    if args.action == "list":
        print(list_adapters(args.roots))
    elif args.action == "show":
        print(show_adapter(args.path))
    else:
        for line in delete_adapters(args.paths):
            print(line)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from tenant.inventory import cache_stores, clear_cache, list_cache

    stores = cache_stores(cache_dir(), args.redis_url)
    if args.action == "list":
        print(list_cache(stores, args.tenant, as_json=args.json))
    else:
        print(clear_cache(stores, args.tenant, args.address))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from tenant.worker import claim_socket, serve

    claim_socket(args.socket)  # a bad folder answers at once, before torch loads
    return serve(args.socket, args.memory_slots)


COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "generate": cmd_generate,
    "adapters": cmd_adapters,
    "cache": cmd_cache,
    "worker": cmd_worker,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        return COMMANDS[args.command](args)
    except PemaError as e:
        print(f"pema-tenant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pema-tenant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
