"""Per-tenant training metrics for Prometheus: recorded by the ClientApp, scraped from the pod.

ClientApp processes live for one message, but the SuperNode that starts them lives as long as the
tenant. Each ClientApp records its round's figures in a small JSON file on the tenant's own volume
(`record_round`, `record_quality`); a long-lived exporter next to the SuperNode serves that file
as /metrics (`python -m tenant.metrics --state FILE`) and Prometheus scrapes it. This is
Prometheus's pattern for batch work tied to one long-lived instance (node_exporter's textfile
collector), and it keeps every tenant's figures on its own target: Prometheus attaches the
`tenant` label from the target (the pod), so no tenant can write another's series, and `up` says
whether each tenant is there. A Pushgateway would be writable by every tenant and never forgets.

The exposed series carry no `tenant` label; the scrape configuration adds it. Counters (cache
hits and misses) are kept in the same file, so the `_total` series keep counting across processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

JOB = "pema-tenant"  # the scrape job
DEFAULT_PORT = 9102
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
    peak_memory_bytes: int
    step_seconds: float
    round_seconds: float
    memory_build_seconds: float
    cache_hit: bool
    loss: float


# name: (help, kind); kind "gauge" or "counter" (served as name_total)
SERIES: dict[str, tuple[str, str]] = {
    "pema_tenant_train_peak_memory_bytes": (
        "Peak resident memory of the tenant process while it obtained its memories and trained",
        "gauge",
    ),
    "pema_tenant_train_step_seconds": (
        "Mean seconds per optimizer step in the last round",
        "gauge",
    ),
    "pema_tenant_round_seconds": (
        "Wall seconds of the last train round on the tenant (memory + training + saving)",
        "gauge",
    ),
    "pema_tenant_memory_build_seconds": (
        "Seconds to obtain the memories in the last round (build, or load from cache)",
        "gauge",
    ),
    "pema_tenant_loss": ("Validation loss after the last round", "gauge"),
    "pema_tenant_last_round_timestamp_seconds": (
        "Unix time at which the tenant last finished a train round",
        "gauge",
    ),
    "pema_tenant_bleu": ("BLEU on the evaluation sample", "gauge"),
    "pema_tenant_chrf": ("chrF on the evaluation sample", "gauge"),
    "pema_tenant_cache_hits": ("Train rounds whose memory was a cache hit", "counter"),
    "pema_tenant_cache_misses": ("Train rounds whose memory was a cache miss", "counter"),
}


def read_state(state_file: Path) -> dict[str, float]:
    """The recorded figures; an absent or damaged file is an empty record (nothing to serve)."""
    try:
        data = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: float(v) for k, v in data.items() if k in SERIES and isinstance(v, int | float)}


def _update(state_file: Path, changes: dict[str, float], bump: str | None = None) -> None:
    """Merge figures into the file atomically (a reader never sees half of it)."""
    state = read_state(state_file) | changes
    if bump is not None:
        state[bump] = state.get(bump, 0.0) + 1
    state_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_file.with_name(f".{state_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, sort_keys=True))
    os.replace(tmp, state_file)


def record_round(state_file: Path, figures: RoundFigures) -> None:
    """One train round's figures; a file that cannot be written costs a warning, not the round."""
    try:
        _update(
            state_file,
            {
                "pema_tenant_train_peak_memory_bytes": figures.peak_memory_bytes,
                "pema_tenant_train_step_seconds": figures.step_seconds,
                "pema_tenant_round_seconds": figures.round_seconds,
                "pema_tenant_memory_build_seconds": figures.memory_build_seconds,
                "pema_tenant_loss": figures.loss,
                "pema_tenant_last_round_timestamp_seconds": time.time(),
            },
            bump="pema_tenant_cache_hits" if figures.cache_hit else "pema_tenant_cache_misses",
        )
    except OSError as e:
        log.warning("could not record metrics in %s: %s", state_file, e)


def record_quality(state_file: Path, bleu: float, chrf: float) -> None:
    try:
        _update(state_file, {"pema_tenant_bleu": bleu, "pema_tenant_chrf": chrf})
    except OSError as e:
        log.warning("could not record metrics in %s: %s", state_file, e)


class StateCollector(Collector):
    """Serves the state file as it is at each scrape."""

    def __init__(self, state_file: Path) -> None:
        self.state_file = state_file

    def collect(self) -> Iterator[Metric]:
        state = read_state(self.state_file)
        for name, (doc, kind) in SERIES.items():
            if kind == "counter":
                yield CounterMetricFamily(name, doc, value=state.get(name, 0.0))
            elif name in state:
                yield GaugeMetricFamily(name, doc, value=state[name])


def registry(state_file: Path) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StateCollector(state_file))
    return reg


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tenant.metrics",
        description="Serve a tenant's recorded round figures as Prometheus /metrics "
        "(runs next to the SuperNode, as long as it).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--state", type=Path, required=True, help="the file the node config's metrics-file names"
    )
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port of /metrics")
    a = p.parse_args(argv)
    if not 0 <= a.port < 65536:
        print(f"tenant.metrics: error: port {a.port} out of range", file=sys.stderr)
        return 2
    try:
        server, thread = start_http_server(a.port, a.host, registry(a.state))
    except OSError as e:
        print(f"tenant.metrics: error: cannot listen on {a.host}:{a.port}: {e}", file=sys.stderr)
        return 2
    # Printed for scripts and tests that start it on port 0.
    print(f"tenant.metrics: serving {a.state} on port {server.server_port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # SIGTERM's default action ends it too
        thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
