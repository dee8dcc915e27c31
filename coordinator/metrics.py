"""The coordinator's Prometheus metrics, in a registry of its own (so tests can run several)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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

    def add_tenants(self, tenants: Iterable[str]) -> None:
        """Register tenants added by a reload (label values stay bounded by the tenants file)."""
        new = frozenset(tenants) - self.tenants
        self.tenants |= new
        for t in sorted(new):
            self.active_sessions.labels(t).set(0)

    def tenant(self, tenant_id: str | None) -> str:
        """The label value for a tenant: only registered ids, never client-chosen text."""
        return tenant_id if tenant_id in self.tenants else NO_TENANT
