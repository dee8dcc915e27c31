"""Tenant metrics as Prometheus sees them: a real Prometheus scraping one `python -m
tenant.metrics` exporter per tenant (tenant.demo.start_metrics, as the demo and the federation
test run them), fed by record_round / record_quality as the ClientApp calls them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tenant.demo import Processes, promql, start_metrics, wait_for
from tenant.metrics import RoundFigures, record_quality, record_round


def test_each_tenant_is_scraped_under_its_own_label(tmp_path: Path) -> None:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed: run `make metrics-deps`")
    procs = Processes(tmp_path / "logs")
    try:
        metrics = start_metrics(procs, tmp_path, [], ["acme", "globex"])
        assert metrics is not None
        record_round(metrics.files["acme"], RoundFigures(100, 0.1, 2.0, 0.5, False, 1.0))
        record_round(metrics.files["globex"], RoundFigures(200, 0.2, 3.0, 0.5, True, 1.5))
        record_quality(metrics.files["globex"], 12.0, 40.0)
        # globex's file names acme nowhere it could matter: the label is the target's.
        result = wait_for(
            lambda: (
                len(r := promql(metrics.prometheus, "pema_tenant_train_peak_memory_bytes")) == 2
                and r
            ),
            "both tenants' figures in Prometheus",
            timeout=60,
        )
        by_tenant = {s["metric"]["tenant"]: float(s["value"][1]) for s in result}
        assert by_tenant == {"acme": 100.0, "globex": 200.0}
        hits = promql(metrics.prometheus, "pema_tenant_cache_hits_total")
        assert {s["metric"]["tenant"]: float(s["value"][1]) for s in hits} == {
            "acme": 0.0,
            "globex": 1.0,
        }
        up = promql(metrics.prometheus, 'up{job="pema-tenant"}')
        assert {s["metric"]["tenant"] for s in up if s["value"][1] == "1"} == {"acme", "globex"}
    finally:
        procs.stop_all()
