"""`pema-coordinator`: serve the frozen model over gRPC, or hash a tenant token for the config."""

from __future__ import annotations

import argparse
import errno
import getpass
import logging
import os
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

# Only light modules here: arguments are parsed and checked before torch loads (seconds).
from coordinator.config import CoordinatorConfig, TlsConfig, hash_token, load_tenants
from pema.argtypes import add_subparsers, log_level, new_parser, port, positive_int
from pema.errors import PemaError
from pema.settings import DTYPE_NAMES

if TYPE_CHECKING:
    from coordinator.server import CoordinatorServer

log = logging.getLogger(__name__)


def metrics_port(text: str) -> int:
    return -1 if text.strip() == "-1" else port(text)


# SIGTERM: the process is gone at most this long after the grace period, whatever still runs.
EXIT_MARGIN_SECONDS = 4.0


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("pema-coordinator", __doc__)
    sub = add_subparsers(parser)
    s = sub.add_parser(
        "serve",
        help="serve the frozen model",
        description="Serve the frozen model over gRPC. SIGHUP reloads the tenants file (tokens, "
        "limits, tenants added or removed) without dropping live sessions; SIGTERM drains.",
    )
    s.add_argument(
        "--model",
        type=Path,
        default=None,
        help="HF model folder, or a model name: gemma-3-270m (opt-in, Gemma terms; `make gemma`) "
        "(default: SmolLM2-135M-Instruct)",
    )
    s.add_argument(
        "--dtype",
        default=None,
        choices=DTYPE_NAMES,
        help="forward dtype (default: $PEMA_DTYPE, else auto: the faster of bf16 and fp32 here)",
    )
    s.add_argument(
        "--device",
        default=None,
        help="auto, cpu or cuda[:N] (default: $PEMA_DEVICE, else auto: CUDA when present)",
    )
    s.add_argument("--host", default="[::]", help="gRPC listen address")
    s.add_argument("--port", type=port, default=50051, help="gRPC port (0: any free port)")
    s.add_argument("--metrics-host", default="0.0.0.0", help="Prometheus /metrics address")
    s.add_argument(
        "--metrics-port", type=metrics_port, default=9100, help="/metrics port; -1 disables it"
    )
    s.add_argument(
        "--tenants",
        type=Path,
        default=None,
        help="tenants JSON/TOML, reloaded on SIGHUP (default: $PEMA_COORDINATOR_TENANTS)",
    )
    s.add_argument("--tls-cert", type=Path, default=None, help="server certificate (PEM)")
    s.add_argument("--tls-key", type=Path, default=None, help="server private key (PEM)")
    s.add_argument(
        "--tls-client-ca",
        type=Path,
        default=None,
        help="require client certificates signed by this CA (mTLS)",
    )
    s.add_argument(
        "--max-batch-tokens",
        type=positive_int,
        default=4096,
        help="rows x longest row of one encode forward pass",
    )
    s.add_argument(
        "--max-queued-tokens",
        type=positive_int,
        default=262144,
        help="queued tokens across tenants beyond which new work is UNAVAILABLE",
    )
    s.add_argument(
        "--max-message-bytes",
        type=positive_int,
        default=8 << 20,
        help="a larger request is INVALID_ARGUMENT",
    )
    s.add_argument(
        "--grace-seconds",
        type=float,
        default=30.0,
        help="SIGTERM: in-flight calls get this long, then are cancelled; the process exits "
        f"at most {EXIT_MARGIN_SECONDS:g} s later",
    )
    s.add_argument(
        "--resume-window-seconds",
        type=float,
        default=120.0,
        help="a decode session whose stream dropped can be resumed this long; a new session "
        "at the tenant's limit replaces its oldest dropped one",
    )
    s.add_argument(
        "--rpc-threads",
        type=positive_int,
        default=32,
        help="threads for tenants' calls; all but 4 may hold admitted calls",
    )
    s.add_argument(
        "--reserved-calls",
        type=positive_int,
        default=2,
        help="calls per tenant that no other tenant can take from the server-wide budget",
    )
    s.add_argument(
        "--reflection",
        action="store_true",
        help="serve gRPC server reflection, unauthenticated (off unless given)",
    )
    s.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)"
    )
    s.add_argument("--log-level", type=log_level, default="INFO", help="logging level")
    h = sub.add_parser(
        "hash-token",
        help="print the sha256 of a token for the tenants file",
        description="Reads the token from stdin (a prompt without echo on a terminal), so that "
        "it never appears in shell history or `ps`; --generate makes a new one.",
    )
    h.add_argument(
        "--generate",
        action="store_true",
        help="make a random token: prints the token, then its digest, one per line",
    )
    s.add_argument(
        "--health-port",
        type=metrics_port,
        default=-1,
        help="plaintext port serving only grpc.health.v1, for probes that cannot speak TLS; "
        "-1: none",
    )
    s.add_argument(
        "--decode-wait-ms",
        type=float,
        default=20.0,
        help="a decode pass waits up to this long for the sessions of the last pass to send "
        "their next steps, so they stay batched",
    )
    pm = sub.add_parser(
        "provision-model",
        help="convert the default model into a cache folder and record this CPU's dtype choice "
        "there; print the model's path",
    )
    pm.add_argument("--cache-dir", type=Path, default=None, help="where (default: $PEMA_CACHE_DIR)")
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
        health_port=None if args.health_port < 0 else args.health_port,
        max_batch_tokens=args.max_batch_tokens,
        max_queued_tokens=args.max_queued_tokens,
        max_message_bytes=args.max_message_bytes,
        grace_seconds=args.grace_seconds,
        session_idle_seconds=args.resume_window_seconds,
        rpc_threads=args.rpc_threads,
        reserved_calls=args.reserved_calls,
        reflection=args.reflection,
        threads=args.threads,
        decode_wait_seconds=args.decode_wait_ms / 1000,
    )


def reload_tenants(server: CoordinatorServer, path: Path | None) -> None:
    """SIGHUP: read the tenants again; a bad file is logged and the running tenants stay."""
    try:
        server.reload_tenants(load_tenants(path))
    except PemaError as e:
        log.error("tenants not reloaded, keeping the previous ones: %s", e)


def check_port_free(host: str, port_number: int) -> None:
    """Refuse a port in use before loading the model (seconds), in one line; gRPC would print a
    C-core log line of its own. The server's bind (SO_REUSEPORT off) still guards the race."""
    if port_number == 0:
        return
    name = host.strip("[]") or None
    try:
        addresses = socket.getaddrinfo(name, port_number, type=socket.SOCK_STREAM)
    except OSError as e:
        raise PemaError(f"cannot listen on {host}:{port_number}: {e.strerror or e}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "[::]" takes v4 too
            try:
                probe.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise PemaError(
                        f"cannot listen on {host}:{port_number}: the port is in use "
                        "(another coordinator?)"
                    ) from None
                raise PemaError(f"cannot listen on {host}:{port_number}: {e.strerror}") from None


def serve(config: CoordinatorConfig, tenants_path: Path | None) -> int:
    from coordinator.server import CoordinatorServer  # loads torch: not needed for hash-token

    check_port_free(config.host, config.port)
    server = CoordinatorServer(config)
    stop = threading.Event()
    reload = threading.Event()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        reload.set()
        stop.set()  # wakes the loop below, which tells the two apart

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hangup)
    server.start()
    # Printed for scripts and tests that start the server on port 0.
    print(
        f"pema-coordinator: listening on port {server.port}, metrics {server.metrics_port}",
        flush=True,
    )
    while True:
        stop.wait()
        if not reload.is_set():
            break
        reload.clear()
        stop.clear()
        reload_tenants(server, tenants_path)
        print("pema-coordinator: tenants reloaded", flush=True)
    log.info("signal received: draining")

    def hard_exit() -> None:
        # A call that ignores cancellation (a thread stuck where gRPC cannot reach it) must not
        # keep a SIGTERM'd pod alive until the kubelet kills it.
        log.error("shutdown still running %.1f s after its grace: exiting", EXIT_MARGIN_SECONDS)
        logging.shutdown()
        os._exit(1)

    watchdog = threading.Timer(config.grace_seconds + EXIT_MARGIN_SECONDS, hard_exit)
    watchdog.daemon = True
    watchdog.start()
    server.stop()
    # Everything is stopped and nothing is left to save. Interpreter teardown would garbage-collect
    # grpcio's server while a client still holds a connection open, which blocks in C with the
    # GIL held (about 5 s with one open stream, measured), where the watchdog cannot run.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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


def read_token() -> str:
    if sys.stdin.isatty():
        token = getpass.getpass("token: ")
    else:
        token = sys.stdin.readline().rstrip("\r\n")
    if not token.strip():
        raise PemaError("hash-token: no token on stdin (or pass --generate)")
    return token


def hash_token_command(generate: bool) -> int:
    if generate:
        token = secrets.token_urlsafe(32)
        print(token)
    else:
        token = read_token()
    print(hash_token(token))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "hash-token":
            return hash_token_command(args.generate)
        if args.command == "provision-model":
            return provision_model(args.cache_dir)
        logging.basicConfig(
            level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        return serve(config_from_args(args), args.tenants)
    except PemaError as e:
        print(f"pema-coordinator: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
