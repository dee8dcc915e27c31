"""The coordinator's Prometheus metrics, in a registry of its own (so tests can run several).

Besides the service's own families, the registry carries the default process and platform
collectors (CPU seconds, resident memory, open fds, Python version), saturation gauges (calls in
flight, queued tokens against the limit, decode sessions, batch occupancy), an info metric naming
the model, its revision, dtype and device, and gRPC request metrics under the conventional
go-grpc-prometheus names (`grpc_server_handled_total`, `grpc_server_handling_seconds`, ...) from
py-grpc-prometheus, so ready-made gRPC dashboards and alerts work unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from py_grpc_prometheus import grpc_utils
from py_grpc_prometheus.prometheus_server_interceptor import PromServerInterceptor

# Calls that fail authentication have no tenant; they share one label value that no tenant id can
# take (ids start with [a-z0-9]), so the label's values stay the registered ids plus this one.
NO_TENANT = "_unauthenticated"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class Metrics:
    def __init__(self, tenants: Iterable[str]) -> None:
        self.tenants = frozenset(tenants)
        self.registry = CollectorRegistry()
        r = self.registry
        # The same collectors prometheus_client puts on its global registry, on ours.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter(
            "pema_coordinator_requests",
            "Calls by tenant, method and final status code",
            ["tenant", "method", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "pema_coordinator_request_seconds",
            "Wall time of a call, first byte in to last byte out",
            ["tenant", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "pema_coordinator_tokens",
            "Tokens served: encode_input (prompt+target ids), keys (keys returned), "
            "generated (free-running), decode_prompt, decode_step",
            ["tenant", "kind"],
            registry=r,
        )
        self.batch_tokens = Histogram(
            "pema_coordinator_batch_tokens",
            "Padded tokens (rows x longest row) of one merged encode forward pass",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_tenants = Histogram(
            "pema_coordinator_batch_tenants",
            "Distinct tenants whose items share one encode forward pass",
            buckets=(1, 2, 3, 4, 6, 8, 16),
            registry=r,
        )
        self.queue_seconds = Histogram(
            "pema_coordinator_queue_seconds",
            "Time a unit of work waits for the model worker",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.active_sessions = Gauge(
            "pema_coordinator_active_sessions",
            "Decode sessions held (attached or awaiting resume)",
            ["tenant"],
            registry=r,
        )
        for t in sorted(self.tenants):
            self.active_sessions.labels(t).set(0)
        self.calls_in_flight = Gauge(
            "pema_coordinator_calls_in_flight",
            "Calls being served now, all tenants (new calls are UNAVAILABLE at the server's cap)",
            registry=r,
        )
        self.max_calls = Gauge(
            "pema_coordinator_max_calls",
            "The server's cap on calls in flight",
            registry=r,
        )
        self.queued_tokens = Gauge(
            "pema_coordinator_queued_tokens",
            "Encode tokens waiting for or in the model worker, all tenants",
            registry=r,
        )
        self.max_queued_tokens = Gauge(
            "pema_coordinator_max_queued_tokens",
            "--max-queued-tokens: beyond it new encode work is UNAVAILABLE",
            registry=r,
        )
        self.decode_batch_rows = Histogram(
            "pema_coordinator_decode_batch_rows",
            "Sequences stepped together in one decode forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.batch_occupancy = Gauge(
            "pema_coordinator_batch_occupancy",
            "Fill of the last forward pass: encode padded tokens / --max-batch-tokens, decode "
            "rows / the decode row cap",
            ["kind"],
            registry=r,
        )
        for kind in ("encode", "decode"):
            self.batch_occupancy.labels(kind).set(0)
        self.model = Info(
            "pema_coordinator_model",
            "The served model: name, weights revision, forward dtype and device",
            registry=r,
        )
        self.grpc = StreamingPromServerInterceptor(enable_handling_time_histogram=True, registry=r)

    def watch(
        self,
        calls_in_flight: Callable[[], float],
        max_calls: int,
        queued_tokens: Callable[[], float],
        max_queued_tokens: int,
        model: dict[str, str],
    ) -> None:
        """Tie the saturation gauges to the live counters they read at every scrape."""
        self.calls_in_flight.set_function(calls_in_flight)
        self.max_calls.set(max_calls)
        self.queued_tokens.set_function(queued_tokens)
        self.max_queued_tokens.set(max_queued_tokens)
        self.model.info(model)

    def add_tenants(self, tenants: Iterable[str]) -> None:
        """Register tenants added by a reload (label values stay bounded by the tenants file)."""
        new = frozenset(tenants) - self.tenants
        self.tenants |= new
        for t in sorted(new):
            self.active_sessions.labels(t).set(0)

    def tenant(self, tenant_id: str | None) -> str:
        """The label value for a tenant: only registered ids, never client-chosen text."""
        return tenant_id if tenant_id in self.tenants else NO_TENANT


class StreamingPromServerInterceptor(PromServerInterceptor):
    """py-grpc-prometheus, plus what it leaves out for server-streaming methods.

    The library counts `grpc_server_handled_total` and observes `grpc_server_handling_seconds`
    only for unary responses (a streaming call has not finished when its handler returns an
    iterator). Encode, GetHead and Decode stream, so here their response iterator is wrapped and
    both are recorded when it ends: exhausted (OK), aborted (the code set on the context), or
    closed by a cancelled client."""

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        handler = super().intercept_service(continuation, handler_call_details)
        if handler is None or not handler.response_streaming:
            return handler
        service, method, _ = grpc_utils.split_method_call(handler_call_details)

        def wrap(behavior: Any, request_streaming: bool, response_streaming: bool) -> Any:
            grpc_type = grpc_utils.get_method_type(request_streaming, response_streaming)

            def record(context: grpc.ServicerContext, start: float, failed: bool) -> None:
                code = self._compute_status_code(context)
                if failed and code == grpc.StatusCode.OK:
                    code = grpc.StatusCode.UNKNOWN
                self.increase_grpc_server_handled_total_counter(
                    grpc_type, service, method, code.name
                )
                self._metrics["grpc_server_handled_histogram"].labels(
                    grpc_type=grpc_type, grpc_service=service, grpc_method=method
                ).observe(max(time.perf_counter() - start, 0.0))

            def new_behavior(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                start = time.perf_counter()
                failed = False
                try:
                    yield from behavior(request, context)
                except BaseException:
                    failed = True
                    raise
                finally:
                    record(context, start, failed)

            return new_behavior

        return self._wrap_rpc_behavior(handler, wrap)
