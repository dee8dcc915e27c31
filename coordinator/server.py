"""Assembling the coordinator: model, worker, gRPC server (+ health, reflection), /metrics."""

from __future__ import annotations

import logging
import tempfile
import threading
from concurrent import futures
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from coordinator.config import CoordinatorConfig
from coordinator.metrics import Metrics
from coordinator.service import SERVICE_NAME, CoordinatorService
from coordinator.worker import ModelWorker
from pema.backbone import FrozenLM
from pema.dtypes import resolve_device, resolve_dtype
from pema.models import (
    DEFAULT_MODEL_NAME,
    load_causal_lm,
    model_revision,
    probe_shape,
    resolve_model_dir,
)
from proto.gen.pemaservice.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SESSION_SWEEP_SECONDS = 10.0


def tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, bytes]:
    """The files `save_pretrained` writes: exactly what a tenant needs to load it, no weights."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def load_model(config: CoordinatorConfig) -> tuple[FrozenLM, PreTrainedTokenizerBase]:
    model_dir = resolve_model_dir(config.model)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device, probe_shape(model_dir))
    model, tokenizer = load_causal_lm(model_dir, dtype, device)
    name = DEFAULT_MODEL_NAME if config.model is None else model_dir.name
    lm = FrozenLM(model, name, model_revision(model_dir), config.max_batch_tokens)
    return lm, tokenizer


class CoordinatorServer:
    """The running coordinator. `start()` binds the ports; `stop()` drains and shuts down."""

    def __init__(
        self,
        config: CoordinatorConfig,
        lm: FrozenLM | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        if (lm is None) != (tokenizer is None):
            raise ValueError("pass both lm and tokenizer, or neither")
        if lm is None or tokenizer is None:
            lm, tokenizer = load_model(config)
        self.config = config
        self.lm = lm
        self.metrics = Metrics(t.id for t in config.tenants)
        self.worker = ModelWorker(
            lm,
            self.metrics,
            config.max_batch_tokens,
            config.max_queued_tokens,
            config.threads,
            config.decode_wait_seconds,
        )
        self.service = CoordinatorService(
            config, lm, tokenizer_files(tokenizer), self.worker, self.metrics
        )
        self.metrics.watch(
            calls_in_flight=lambda: self.service.calls_in_flight,
            max_calls=self.service.max_calls,
            queued_tokens=lambda: self.worker.queued_tokens,
            max_queued_tokens=config.max_queued_tokens,
            model={
                "name": lm.info.name,
                "revision": lm.info.revision,
                "dtype": lm.info.dtype,
                "device": str(lm.device),
            },
        )
        self.health = health.HealthServicer(experimental_non_blocking=True)
        # gRPC's own size check answers RESOURCE_EXHAUSTED; it sits above ours (INVALID_ARGUMENT,
        # with a message saying what to do), so only absurd messages meet it.
        limit = 2 * config.max_message_bytes
        self.server = grpc.server(
            futures.ThreadPoolExecutor(config.rpc_threads, thread_name_prefix="rpc"),
            interceptors=[self.metrics.grpc],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", 64 << 20),
            ],
        )
        pb_grpc.add_CoordinatorServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self.server,
        )
        self.port = 0
        self.metrics_port: int | None = None
        self._metrics_http: WSGIServer | None = None
        self._stopped = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="session-sweeper", daemon=True)

    def _bind(self) -> int:
        address = f"{self.config.host}:{self.config.port}"
        tls = self.config.tls
        if tls is None:
            return self.server.add_insecure_port(address)
        credentials = grpc.ssl_server_credentials(
            [(tls.key.read_bytes(), tls.cert.read_bytes())],
            root_certificates=tls.client_ca.read_bytes() if tls.client_ca else None,
            require_client_auth=tls.client_ca is not None,
        )
        return self.server.add_secure_port(address, credentials)

    def start(self) -> None:
        self.port = self._bind()
        if self.port == 0:
            raise OSError(f"cannot bind {self.config.host}:{self.config.port}")
        if self.config.metrics_port is not None:
            self._metrics_http, _ = start_http_server(
                self.config.metrics_port, self.config.metrics_host, self.metrics.registry
            )
            self.metrics_port = int(self._metrics_http.server_port)
        self.worker.start()
        self.server.start()
        self._sweeper.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving %s (revision %s, %s on %s) on port %d, metrics on %s",
            self.lm.info.name,
            self.lm.info.revision,
            self.lm.info.dtype,
            self.lm.device,
            self.port,
            self.metrics_port,
        )

    def _sweep(self) -> None:
        while not self._stopped.wait(SESSION_SWEEP_SECONDS):
            self.service.expire_sessions()

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, let in-flight calls finish (up to grace)."""
        grace = self.config.grace_seconds if grace is None else grace
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.worker.stop()
        self._stopped.set()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("coordinator stopped")

    def wait(self) -> None:
        self.server.wait_for_termination()
