"""Assembling the coordinator: model, worker, gRPC server (+ health, reflection), /metrics."""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import start_http_server
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from coordinator.config import ConfigError, CoordinatorConfig, Tenant
from coordinator.metrics import Metrics
from coordinator.service import SERVICE_NAME, CoordinatorService, method_handlers
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
from proto.gen.pemaservice.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)
SESSION_SWEEP_SECONDS = 10.0
# Health checks and reflection run on small pools of their own: a flood of either cannot take the
# threads tenants' calls run on, nor can tenants' calls starve the kubelet's probes.
HEALTH_THREADS = 4
REFLECTION_THREADS = 2
# A reflection stream carries no credentials: it is cancelled after this long, so idle ones do
# not hold even their own pool.
REFLECTION_STREAM_SECONDS = 10.0
# After the grace period gRPC cancels what is left; this long more and stop() returns regardless.
STOP_MARGIN_SECONDS = 2.0


class BoundedReflection(reflection.ReflectionServicer):
    """Server reflection whose streams end after REFLECTION_STREAM_SECONDS."""

    def ServerReflectionInfo(
        self,
        request_iterator: Iterator[reflection_pb2.ServerReflectionRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[reflection_pb2.ServerReflectionResponse]:
        timer = threading.Timer(REFLECTION_STREAM_SECONDS, context.cancel)
        timer.daemon = True
        timer.start()
        try:
            yield from super().ServerReflectionInfo(request_iterator, context)
        except grpc.RpcError:
            return  # cancelled (by the timer or the client): nobody to answer
        finally:
            timer.cancel()


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
        self._pools = [
            futures.ThreadPoolExecutor(config.rpc_threads, thread_name_prefix="rpc"),
            futures.ThreadPoolExecutor(HEALTH_THREADS, thread_name_prefix="health"),
        ]
        self.server = grpc.server(
            self._pools[0],
            interceptors=[self.metrics.grpc],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", 64 << 20),
                # gRPC sets SO_REUSEPORT by default: a second server on a busy port would "start"
                # and silently share its traffic. Off, binding a port in use fails.
                ("grpc.so_reuseport", 0),
            ],
        )
        service = pb.DESCRIPTOR.services_by_name["Coordinator"]
        health_service = health_pb2.DESCRIPTOR.services_by_name["Health"]
        handlers = [
            method_handlers(service, self.service, raw_requests=True),
            method_handlers(health_service, self.health, self._pools[1]),
        ]
        if config.reflection:
            self._pools.append(
                futures.ThreadPoolExecutor(REFLECTION_THREADS, thread_name_prefix="reflection")
            )
            names = [SERVICE_NAME, health_service.full_name, reflection.SERVICE_NAME]
            handlers.append(
                method_handlers(
                    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
                    BoundedReflection(names),
                    self._pools[2],
                )
            )
        self.server.add_generic_rpc_handlers(handlers)
        self.port = 0
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self._health_server: grpc.Server | None = None
        self._metrics_http: WSGIServer | None = None
        self._stopped = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="session-sweeper", daemon=True)

    def _bind(self) -> int:
        address = f"{self.config.host}:{self.config.port}"
        tls = self.config.tls
        if tls is None:
            return self.server.add_insecure_port(address)
        chain, key, client_ca = tls.pem()
        credentials = grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )
        return self.server.add_secure_port(address, credentials)

    def _bind_health(self) -> None:
        """Health alone, in plaintext, on its own server: the kubelet's gRPC probe cannot speak
        TLS, and a plaintext port on the main server would serve the Coordinator API (and carry
        tenants' tokens) unencrypted."""
        if self.config.health_port is None:
            return
        self._health_server = grpc.server(
            futures.ThreadPoolExecutor(2, thread_name_prefix="health")
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
        address = f"{self.config.host}:{self.config.health_port}"
        self.health_port = self._health_server.add_insecure_port(address)
        if self.health_port == 0:
            raise OSError(f"cannot bind {address}")
        self._health_server.start()

    def start(self) -> None:
        try:
            self.port = self._bind()
        except RuntimeError:  # grpc raises it when the address cannot be bound
            self.port = 0
        if self.port == 0:
            raise ConfigError(
                f"cannot listen on {self.config.host}:{self.config.port}: "
                "the port is in use (or the address is not this machine's)"
            )
        if self.config.metrics_port is not None:
            self._metrics_http, _ = start_http_server(
                self.config.metrics_port, self.config.metrics_host, self.metrics.registry
            )
            self.metrics_port = int(self._metrics_http.server_port)
        self.worker.start()
        self.server.start()
        self._bind_health()
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

    def reload_tenants(self, tenants: tuple[Tenant, ...]) -> None:
        self.metrics.add_tenants(t.id for t in tenants)
        self.service.reload_tenants(tenants)
        log.info("tenants reloaded: %s", ", ".join(t.id for t in tenants))

    def _sweep(self) -> None:
        while not self._stopped.wait(SESSION_SWEEP_SECONDS):
            self.service.expire_sessions()

    def stop(self, grace: float | None = None) -> bool:
        """Health NOT_SERVING, refuse new calls, let in-flight calls finish (up to grace), then
        cancel the rest. Returns within grace + STOP_MARGIN_SECONDS (+ a model pass running at
        that moment); False if gRPC had not finished stopping by then."""
        grace = self.config.grace_seconds if grace is None else grace
        self.health.enter_graceful_shutdown()
        stopped = self.server.stop(grace)
        # gRPC sets the event once it has cancelled what was left at the end of the grace: look
        # just before, while the calls about to be cut off are still counted.
        drained = stopped.wait(max(0.0, grace - 0.1))
        if not drained:
            cut = self.service.in_flight()
            log.warning(
                "grace period of %.1f s over: cancelling %d calls (%s)",
                grace,
                sum(cut.values()),
                ", ".join(f"{t} {m} x{n}" for (t, m), n in sorted(cut.items())) or "none",
            )
            drained = stopped.wait(STOP_MARGIN_SECONDS)
            if not drained:
                log.warning("gRPC had not stopped %.1f s after its grace: giving up", grace)
        if self._health_server is not None:
            self._health_server.stop(0)
        self.worker.stop()
        self._stopped.set()
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=True)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("coordinator stopped")
        return drained

    def wait(self) -> None:
        self.server.wait_for_termination()
