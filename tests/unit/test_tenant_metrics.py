"""The tenant's round figures: recorded by ClientApp processes, served by the exporter."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import generate_latest

from tenant.metrics import RoundFigures, main, read_state, record_quality, record_round, registry


def figures(hit: bool, peak: int = 1000) -> RoundFigures:
    return RoundFigures(peak, 0.1, 2.0, 0.5, hit, 1.25)


def test_rounds_accumulate_counters_and_replace_gauges(tmp_path: Path) -> None:
    state = tmp_path / "t" / "metrics.json"
    record_round(state, figures(False, peak=1000))
    record_round(state, figures(True, peak=2000))
    record_round(state, figures(True, peak=3000))
    record_quality(state, 12.5, 40.0)
    text = generate_latest(registry(state)).decode()
    assert "pema_tenant_cache_hits_total 2.0" in text
    assert "pema_tenant_cache_misses_total 1.0" in text
    assert "pema_tenant_train_peak_memory_bytes 3000.0" in text
    assert "pema_tenant_bleu 12.5" in text and "pema_tenant_loss 1.25" in text
    assert "tenant=" not in text  # the scrape sets the tenant label, never the tenant
    assert list(state.parent.iterdir()) == [state]  # no temporary file left


def test_a_missing_or_damaged_file_serves_nothing_but_zero_counters(tmp_path: Path) -> None:
    state = tmp_path / "metrics.json"
    assert read_state(state) == {}
    state.write_text('{"pema_tenant_loss": "x", "other": 1, "pema_tenant_bleu": 3}')
    assert read_state(state) == {"pema_tenant_bleu": 3.0}
    state.write_text("not json")
    text = generate_latest(registry(state)).decode()
    assert "pema_tenant_cache_hits_total 0.0" in text and "pema_tenant_loss" not in text


def test_an_unwritable_file_costs_a_warning_not_the_round(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    record_round(blocker / "metrics.json", figures(True))  # its parent is a file
    assert "could not record metrics" in caplog.text


def test_exporter_bad_port_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--state", str(tmp_path / "m.json"), "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of range" in err
