"""Per-tenant training metrics for Prometheus, pushed to a Pushgateway.

ClientApp processes live for one message, far shorter than a scrape interval, so they push their
figures to a Pushgateway (grouping key `job="pema-tenant", tenant=…`) that Prometheus scrapes.
Values are last-round gauges; the cache counters are kept in a small state file next to the
tenant's adapter so that the `_total` series keep counting across processes.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from prometheus_client import CollectorRegistry, Counter, Gauge, pushadd_to_gateway

log = logging.getLogger(__name__)

JOB = "pema-tenant"
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRss:
    """Samples this process's resident memory in a thread while a block runs.

    `peak` is the highest RSS seen; `extra` what the block added above its starting RSS (the
    training's own footprint, without the model and libraries loaded before it)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRss:
        self.start = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra(self) -> int:
        return self.peak - self.start


@dataclass
class RoundFigures:
    tenant: str
    peak_memory_bytes: int
    step_seconds: float
    round_seconds: float
    memory_build_seconds: float
    cache_hit: bool
    loss: float


def _bump_counters(state_file: Path, hit: bool) -> dict[str, int]:
    """Persisted hit/miss totals: each ClientApp process starts from zero otherwise."""
    try:
        totals = json.loads(state_file.read_text())
    except (OSError, ValueError):
        totals = {}
    totals = {k: int(totals.get(k, 0)) for k in ("hits", "misses")}
    totals["hits" if hit else "misses"] += 1
    state_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_file.with_name(state_file.name + ".tmp")
    tmp.write_text(json.dumps(totals))
    os.replace(tmp, state_file)
    return totals


def push_round(gateway: str, figures: RoundFigures, state_file: Path) -> None:
    """Push one round's training figures; a gateway that is down costs a warning, not the round."""
    totals = _bump_counters(state_file, figures.cache_hit)
    reg = CollectorRegistry()
    labels = ["tenant"]

    def gauge(name: str, doc: str, value: float) -> None:
        Gauge(name, doc, labels, registry=reg).labels(figures.tenant).set(value)

    gauge(
        "pema_tenant_train_peak_memory_bytes",
        "Peak resident memory of the tenant process while it obtained its memories and trained",
        figures.peak_memory_bytes,
    )
    gauge(
        "pema_tenant_train_step_seconds",
        "Mean seconds per optimizer step in the last round",
        figures.step_seconds,
    )
    gauge(
        "pema_tenant_round_seconds",
        "Wall seconds of the last train round on the tenant (memory + training + saving)",
        figures.round_seconds,
    )
    gauge(
        "pema_tenant_memory_build_seconds",
        "Seconds to obtain the memories in the last round (build, or load from cache)",
        figures.memory_build_seconds,
    )
    gauge("pema_tenant_loss", "Validation loss after the last round", figures.loss)
    for kind, doc in (("hits", "hit"), ("misses", "miss")):
        Counter(
            f"pema_tenant_cache_{kind}", f"Train rounds whose memory was a cache {doc}", labels,
            registry=reg,
        ).labels(figures.tenant).inc(totals[kind])  # fmt: skip
    try:
        pushadd_to_gateway(gateway, job=JOB, grouping_key={"tenant": figures.tenant}, registry=reg)
    except OSError as e:
        log.warning("could not push metrics to the Pushgateway at %s: %s", gateway, e)


def push_quality(gateway: str, tenant: str, bleu: float, chrf: float) -> None:
    reg = CollectorRegistry()
    Gauge("pema_tenant_bleu", "BLEU on the evaluation sample", ["tenant"], registry=reg).labels(
        tenant
    ).set(bleu)
    Gauge("pema_tenant_chrf", "chrF on the evaluation sample", ["tenant"], registry=reg).labels(
        tenant
    ).set(chrf)
    try:
        pushadd_to_gateway(gateway, job=JOB, grouping_key={"tenant": tenant}, registry=reg)
    except OSError as e:
        log.warning("could not push metrics to the Pushgateway at %s: %s", gateway, e)
