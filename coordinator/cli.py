"""`pema-coordinator`: serve the frozen model over gRPC, or hash a tenant token for the config."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from coordinator.config import CoordinatorConfig, TlsConfig, hash_token, load_tenants
from pema.errors import PemaError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pema-coordinator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the frozen model")
    s.add_argument("--model", type=Path, default=None, help="HF model folder (default: SmolLM2)")
    s.add_argument(
        "--dtype",
        default=None,
        choices=["auto", "bfloat16", "float32", "float16"],
        help="forward dtype (default: $PEMA_DTYPE, else auto: the faster of bf16 and fp32 here)",
    )
    s.add_argument(
        "--device",
        default=None,
        help="auto, cpu or cuda[:N] (default: $PEMA_DEVICE, else auto: CUDA when present)",
    )
    s.add_argument("--host", default="[::]")
    s.add_argument("--port", type=int, default=50051)
    s.add_argument("--metrics-host", default="0.0.0.0")
    s.add_argument("--metrics-port", type=int, default=9100, help="-1 disables /metrics")
    s.add_argument(
        "--tenants", type=Path, default=None, help="tenants JSON/TOML (else the env variable)"
    )
    s.add_argument("--tls-cert", type=Path, default=None)
    s.add_argument("--tls-key", type=Path, default=None)
    s.add_argument("--tls-client-ca", type=Path, default=None, help="require client certs (mTLS)")
    s.add_argument("--max-batch-tokens", type=int, default=4096)
    s.add_argument("--max-queued-tokens", type=int, default=262144)
    s.add_argument("--max-message-bytes", type=int, default=8 << 20)
    s.add_argument("--grace-seconds", type=float, default=30.0)
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s.add_argument(
        "--decode-wait-ms",
        type=float,
        default=20.0,
        help="a decode pass waits up to this long for the sessions of the last pass to send "
        "their next steps, so they stay batched (default: %(default)s)",
    )
    s.add_argument("--log-level", default="INFO")
    h = sub.add_parser("hash-token", help="print the sha256 of a token for the tenants file")
    h.add_argument("token")
    pm = sub.add_parser(
        "provision-model",
        help="convert the default model into a cache folder and record this CPU's dtype choice "
        "there; print the model's path",
    )
    pm.add_argument("--cache-dir", type=Path, default=None, help="default: $PEMA_CACHE_DIR")
    return parser


def config_from_args(args: argparse.Namespace) -> CoordinatorConfig:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise PemaError("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise PemaError("--tls-client-ca needs --tls-cert and --tls-key")
    tls = TlsConfig(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    return CoordinatorConfig(
        tenants=load_tenants(args.tenants),
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        host=args.host,
        port=args.port,
        metrics_host=args.metrics_host,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        tls=tls,
        max_batch_tokens=args.max_batch_tokens,
        max_queued_tokens=args.max_queued_tokens,
        max_message_bytes=args.max_message_bytes,
        grace_seconds=args.grace_seconds,
        threads=args.threads,
        decode_wait_seconds=args.decode_wait_ms / 1000,
    )


def serve(config: CoordinatorConfig) -> int:
    from coordinator.server import CoordinatorServer  # loads torch: not needed for hash-token

    server = CoordinatorServer(config)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    # Printed for scripts and tests that start the server on port 0.
    print(
        f"pema-coordinator: listening on port {server.port}, metrics {server.metrics_port}",
        flush=True,
    )
    stop.wait()
    logging.getLogger(__name__).info("signal received: draining")
    server.stop()
    return 0


def provision_model(cache: Path | None) -> int:
    """Fill a volume with the default model and, on a CPU node, this CPU's recorded forward dtype
    choice for it (a Kubernetes init step); idempotent: what is there already is kept."""
    from pema.dtypes import CHOICES_FILE, recorded_cpu_dtype, resolve_device  # loads torch
    from pema.models import cache_dir, default_model_dir, probe_shape

    try:
        folder = default_model_dir(cache)
        if resolve_device().type == "cpu":
            recorded_cpu_dtype(probe_shape(folder), (cache or cache_dir()) / CHOICES_FILE)
        print(folder, flush=True)
    except PemaError as e:
        print(f"pema-coordinator: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "hash-token":
        print(hash_token(args.token))
        return 0
    if args.command == "provision-model":
        return provision_model(args.cache_dir)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return serve(config_from_args(args))
    except PemaError as e:
        print(f"pema-coordinator: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
