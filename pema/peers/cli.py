"""`pema-peers train-eval` (or `python -m pema.peers.cli train-eval`): train one peer method on TSV pairs, score it on a test set.

Prints one JSON object: trainable and served parameter counts, training seconds, the process's
peak RSS right after training (before evaluation), BLEU and chrF, and the DP accountant's figures
when --dp-epsilon is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Only light modules here: arguments are parsed and checked before torch and peft load.
from pema.argtypes import add_subparsers, new_parser, positive_float, positive_int
from pema.data import read_pairs
from pema.errors import PemaError
from pema.settings import DEFAULT_TARGETS, DEFAULT_TEMPLATE

if TYPE_CHECKING:
    from pema.peers.sft import Peer

METHODS = ("untuned", "copy", "full", "lora", "adamix", "slash", "jrwarp")
DP_METHODS = ("slash", "jrwarp")
# Learning rates per method: the usual orders of magnitude for each (full FT small, z large).
DEFAULT_LR = {"full": 2e-5, "lora": 1e-3, "adamix": 1e-3, "slash": 1e-2, "jrwarp": 1e-2}


def peak_rss_mib() -> float:
    from pema.process import peak_rss_bytes

    return round(peak_rss_bytes() / 2**20, 1)


def build_peer(method: str, model: Any, args: argparse.Namespace) -> Peer:
    from pema.peers.lora import AdaMixPeer, full_peer, lora_peer
    from pema.peers.sft import HFPeer
    from pema.peers.shift import ShiftPeer

    targets = args.targets.split(",")
    if method == "untuned":
        return HFPeer(model, model.config)
    if method == "full":
        return full_peer(model)
    if method == "lora":
        return lora_peer(model, args.rank, args.alpha, targets)
    if method == "adamix":
        return AdaMixPeer(model, args.rank, args.alpha, targets, args.mixture, args.consistency)
    return ShiftPeer(model, method, args.k, args.seed)


def train_eval(args: argparse.Namespace) -> dict[str, Any]:
    train_pairs = read_pairs(args.train, args.max_pairs)
    test_pairs = read_pairs(args.test, args.limit)
    import torch

    from pema.evaluation import score
    from pema.generation import token_ratio
    from pema.models import load_causal_lm, resolve_model_dir
    from pema.peers.private import train_peer_private
    from pema.peers.sft import SFTConfig, encode_pairs, evaluate_peer, train_sft
    from pema.prompts import PromptFormat

    result: dict[str, Any] = {
        "method": args.method,
        "train_pairs": len(train_pairs),
        "test_pairs": len(test_pairs),
        "epochs": args.epochs,
        "max_tokens": args.max_tokens,
    }
    if args.method == "copy":
        return {**result, **score([p.source for p in test_pairs], [p.target for p in test_pairs])}
    if args.dp_epsilon is not None and args.method not in DP_METHODS:
        raise PemaError(f"--dp-epsilon is implemented for {DP_METHODS}, not {args.method}")
    model, tokenizer = load_causal_lm(resolve_model_dir(args.model), torch.float32)
    fmt = PromptFormat(tokenizer, args.template)
    peer = build_peer(args.method, model, args)
    rho = token_ratio(
        [len(fmt.text_ids(p.source)) for p in train_pairs],
        [len(fmt.target_ids(p.target)) for p in train_pairs],
    )
    result["trainable_params"] = sum(p.numel() for p in peer.trainable())
    if args.method != "untuned":
        items = encode_pairs(fmt, train_pairs, args.max_tokens)
        cfg = SFTConfig(
            lr=args.lr or DEFAULT_LR[args.method],
            batch_size=args.batch_size,
            epochs=args.epochs,
            max_tokens=args.max_tokens,
            seed=args.seed,
        )
        pad = fmt.eos_id
        if args.dp_epsilon is not None:
            report = train_peer_private(
                peer, items, cfg, pad, args.dp_epsilon, args.dp_max_grad_norm
            )
        else:
            report = train_sft(peer, items, cfg, pad)
        result.update(
            lr=cfg.lr,
            steps=report.steps,
            train_seconds=round(report.seconds, 1),
            seconds_per_epoch=round(report.seconds_per_epoch(cfg.epochs), 1),
            first_loss=round(report.losses[0], 4),
            last_loss=round(report.losses[-1], 4),
            privacy=report.privacy,
        )
    result["train_peak_rss_mib"] = peak_rss_mib()
    peer.prepare_inference()
    result["served_params"] = peer.inference_parameter_count() if args.method != "untuned" else 0
    evaluation = evaluate_peer(peer, fmt, test_pairs, rho, args.eval_batch_size)
    result.update(
        bleu=evaluation["bleu"], chrf=evaluation["chrf"], samples=evaluation["outputs"][:3]
    )
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("pema-peers", __doc__)
    sub = add_subparsers(parser)
    t = sub.add_parser("train-eval", help="train one method and print its scores as JSON")
    t.add_argument("--method", choices=METHODS, required=True, help="the method to train")
    t.add_argument("--train", type=Path, required=True, help="TSV with source and target columns")
    t.add_argument("--test", type=Path, required=True, help="TSV with source and target columns")
    t.add_argument(
        "--model",
        type=Path,
        default=None,
        help="HF model folder, or a model name: gemma-3-270m (opt-in, Gemma terms; `make gemma`) "
        "(default: SmolLM2-135M-Instruct)",
    )
    t.add_argument(
        "--template", default=DEFAULT_TEMPLATE, help="task prompt with a {source} placeholder"
    )
    t.add_argument(
        "--max-pairs", type=positive_int, default=None, help="first N training pairs (default: all)"
    )
    t.add_argument(
        "--limit", type=positive_int, default=None, help="first N test pairs (default: all)"
    )
    t.add_argument("--epochs", type=positive_int, default=1, help="training epochs")
    t.add_argument("--batch-size", type=positive_int, default=8, help="rows per step")
    t.add_argument(
        "--max-tokens", type=positive_int, default=96, help="prompt + target cap per row"
    )
    t.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help=f"learning rate (default per method: {DEFAULT_LR})",
    )
    t.add_argument("--rank", type=positive_int, default=8, help="LoRA/AdaMix rank")
    t.add_argument("--alpha", type=positive_int, default=16, help="LoRA/AdaMix α")
    t.add_argument(
        "--targets", default=",".join(DEFAULT_TARGETS), help="LoRA target modules, comma-separated"
    )
    t.add_argument("--mixture", type=positive_int, default=4, help="AdaMix copies M")
    t.add_argument("--consistency", type=float, default=1.0, help="AdaMix consistency weight")
    t.add_argument("--k", type=positive_int, default=1024, help="SLaSh/JR-WARP vector size")
    t.add_argument(
        "--dp-epsilon",
        type=positive_float,
        default=None,
        help="DP-SGD target ε, δ = 1/2N (default: no DP)",
    )
    t.add_argument(
        "--dp-max-grad-norm", type=positive_float, default=1.0, help="DP clipping bound C"
    )
    t.add_argument(
        "--eval-batch-size", type=positive_int, default=16, help="sequences per generation batch"
    )
    t.add_argument("--seed", type=int, default=0, help="random seed")
    t.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(train_eval(args), ensure_ascii=False))
    except PemaError as e:
        print(f"pema-peers: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
