"""Writes deploy/grafana/dashboard.json (`python deploy/grafana/build_dashboard.py`).

The JSON is generated so that every panel stays short to review here; CI checks that the
committed file matches this script and that every metric it queries is one the code exports.
Import it in Grafana (Dashboards > New > Import), choosing the Prometheus data source.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("dashboard.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
T = 'tenant=~"$tenant"'


def panel(
    title: str,
    targets: list[tuple[str, str]],
    unit: str,
    x: int,
    y: int,
    w: int = 12,
    h: int = 8,
    description: str = "",
) -> dict[str, Any]:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "right", "showLegend": True}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def row(title: str, y: int) -> dict[str, Any]:
    return {
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
        "panels": [],
    }


def dashboard() -> dict[str, Any]:
    rate = "$__rate_interval"
    panels: list[dict[str, Any]] = [
        row("Tenant training (pushed by each tenant's ClientApp, last round)", 0),
        panel(
            "Training peak memory",
            [(f"pema_tenant_train_peak_memory_bytes{{{T}}}", "{{tenant}}")],
            "bytes",
            0,
            1,
            description="Peak RSS of the training process in its last round. The "
            "PemaTenantTrainingMemoryNearLimit alert fires at 90% of the container limit.",
        ),
        panel(
            "Training latency",
            [
                (f"pema_tenant_round_seconds{{{T}}}", "{{tenant}} round"),
                (f"pema_tenant_memory_build_seconds{{{T}}}", "{{tenant}} memory build"),
            ],
            "s",
            12,
            1,
            description="Wall seconds of the last train round, and of obtaining its memories.",
        ),
        panel(
            "Optimizer step time",
            [(f"pema_tenant_train_step_seconds{{{T}}}", "{{tenant}}")],
            "s",
            0,
            9,
            w=8,
        ),
        panel(
            "Memory cache hit ratio",
            [
                (
                    f"pema_tenant_cache_hits_total{{{T}}} / (pema_tenant_cache_hits_total{{{T}}}"
                    f" + pema_tenant_cache_misses_total{{{T}}})",
                    "{{tenant}}",
                )
            ],
            "percentunit",
            8,
            9,
            w=8,
        ),
        panel(
            "Quality",
            [
                (f"pema_tenant_loss{{{T}}}", "{{tenant}} valid loss"),
                (f"pema_tenant_bleu{{{T}}}", "{{tenant}} BLEU"),
                (f"pema_tenant_chrf{{{T}}}", "{{tenant}} chrF"),
            ],
            "short",
            16,
            9,
            w=8,
        ),
        panel(
            "Last report (age)",
            [(f"time() - pema_tenant_last_round_timestamp_seconds{{{T}}}", "{{tenant}}")],
            "s",
            0,
            17,
            w=24,
            h=6,
            description="Seconds since each tenant last finished a train round; "
            "PemaTenantMissingFromRounds fires at 3 h while others still report.",
        ),
        row("Serving (the coordinator, per tenant)", 23),
        panel(
            "Serving latency p50 / p99 (Encode and unary calls)",
            [
                (
                    "histogram_quantile(0.5, sum by (le, tenant, method) (rate("
                    f'pema_coordinator_request_seconds_bucket{{{T}, method!="Decode"}}[{rate}])))',
                    "{{tenant}} {{method}} p50",
                ),
                (
                    "histogram_quantile(0.99, sum by (le, tenant, method) (rate("
                    f'pema_coordinator_request_seconds_bucket{{{T}, method!="Decode"}}[{rate}])))',
                    "{{tenant}} {{method}} p99",
                ),
            ],
            "s",
            0,
            24,
        ),
        panel(
            "Throughput: tokens served",
            [
                (
                    f"sum by (tenant, kind) (rate(pema_coordinator_tokens_total{{{T}}}[{rate}]))",
                    "{{tenant}} {{kind}}",
                )
            ],
            "short",
            12,
            24,
            description="Tokens per second by kind: encode_input, keys, generated, "
            "decode_prompt, decode_step.",
        ),
        panel(
            "Throughput: calls",
            [
                (
                    "sum by (tenant, method) "
                    f"(rate(pema_coordinator_requests_total{{{T}}}[{rate}]))",
                    "{{tenant}} {{method}}",
                )
            ],
            "reqps",
            0,
            32,
        ),
        panel(
            "Errors (calls not OK)",
            [
                (
                    "sum by (tenant, method, code) (rate("
                    f'pema_coordinator_requests_total{{{T}, code!="OK"}}[{rate}]))',
                    "{{tenant}} {{method}} {{code}}",
                ),
                (
                    "sum by (method, code) (rate(pema_coordinator_requests_total"
                    f'{{tenant="_unauthenticated"}}[{rate}]))',
                    "unauthenticated {{method}} {{code}}",
                ),
            ],
            "reqps",
            12,
            32,
        ),
        panel(
            "Active decode sessions",
            [(f"pema_coordinator_active_sessions{{{T}}}", "{{tenant}}")],
            "short",
            0,
            40,
            w=8,
        ),
        panel(
            "Model worker queue wait p99",
            [
                (
                    "histogram_quantile(0.99, sum by (le, kind) "
                    f"(rate(pema_coordinator_queue_seconds_bucket[{rate}])))",
                    "{{kind}}",
                )
            ],
            "s",
            8,
            40,
            w=8,
        ),
        panel(
            "Encode batch: padded tokens p50 and tenants per batch p50",
            [
                (
                    "histogram_quantile(0.5, sum by (le) "
                    f"(rate(pema_coordinator_batch_tokens_bucket[{rate}])))",
                    "tokens",
                ),
                (
                    "histogram_quantile(0.5, sum by (le) "
                    f"(rate(pema_coordinator_batch_tenants_bucket[{rate}])))",
                    "tenants",
                ),
            ],
            "short",
            16,
            40,
            w=8,
        ),
        panel(
            "Scrape targets up",
            [('up{job=~"pema-coordinator|pema-tenant"}', "{{job}} {{instance}}")],
            "short",
            0,
            48,
            w=24,
            h=5,
        ),
        row("Saturation and gRPC (the coordinator, per replica)", 53),
        panel(
            "Queued tokens and calls in flight (fraction of the limit)",
            [
                (
                    "pema_coordinator_queued_tokens / pema_coordinator_max_queued_tokens",
                    "{{instance}} queued tokens",
                ),
                (
                    "pema_coordinator_calls_in_flight / pema_coordinator_max_calls",
                    "{{instance}} calls",
                ),
            ],
            "percentunit",
            0,
            54,
            w=8,
            description="Against --max-queued-tokens and the server's call cap; beyond 1, new "
            "work is UNAVAILABLE. PemaCoordinatorSaturated fires at 80% / 90%.",
        ),
        panel(
            "Batching: occupancy and decode rows per pass",
            [
                ("pema_coordinator_batch_occupancy", "{{instance}} {{kind}} occupancy"),
                (
                    "histogram_quantile(0.5, sum by (le) "
                    f"(rate(pema_coordinator_decode_batch_rows_bucket[{rate}])))",
                    "decode rows p50",
                ),
                ("sum(pema_coordinator_active_sessions)", "decode sessions"),
            ],
            "short",
            8,
            54,
            w=8,
            description="Occupancy of the last pass (encode: padded tokens / --max-batch-tokens;"
            " decode: rows / 64), sequences stepped together per decode pass, live sessions.",
        ),
        panel(
            "Process: CPU and resident memory",
            [
                (
                    f'rate(process_cpu_seconds_total{{job="pema-coordinator"}}[{rate}])',
                    "{{instance}} CPU cores",
                ),
                (
                    'process_resident_memory_bytes{job="pema-coordinator"} / 2^30',
                    "{{instance}} RSS GiB",
                ),
            ],
            "short",
            16,
            54,
            w=8,
        ),
        panel(
            "gRPC calls handled, by method and code",
            [
                (
                    f"sum by (grpc_method, grpc_code) (rate(grpc_server_handled_total[{rate}]))",
                    "{{grpc_method}} {{grpc_code}}",
                )
            ],
            "reqps",
            0,
            62,
            description="py-grpc-prometheus' conventional families, streaming calls included.",
        ),
        panel(
            "gRPC handling time p99, by method",
            [
                (
                    "histogram_quantile(0.99, sum by (le, grpc_method) "
                    f"(rate(grpc_server_handling_seconds_bucket[{rate}])))",
                    "{{grpc_method}}",
                )
            ],
            "s",
            12,
            62,
        ),
        panel(
            "Served model per replica (revision, dtype, device)",
            [
                (
                    "count by (instance, name, revision, dtype, device) "
                    "(pema_coordinator_model_info)",
                    "{{instance}} {{name}} {{revision}} {{dtype}} {{device}}",
                )
            ],
            "short",
            0,
            70,
            w=24,
            h=5,
            description="Every replica must serve one revision: PemaCoordinatorRevisionMismatch.",
        ),
    ]
    for i, p in enumerate(panels):
        p["id"] = i + 1
    return {
        "uid": "pema-federation",
        "title": "PEMA federation",
        "description": "Per-tenant training (Pushgateway) and serving (coordinator) figures.",
        "tags": ["pema"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                },
                {
                    "name": "tenant",
                    "label": "Tenant",
                    "type": "query",
                    "datasource": DS,
                    "query": {
                        "query": "label_values(pema_tenant_train_peak_memory_bytes, tenant)",
                        "refId": "tenants",
                    },
                    "definition": "label_values(pema_tenant_train_peak_memory_bytes, tenant)",
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".+",
                    "current": {"text": "All", "value": "$__all"},
                },
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    OUT.write_text(render())
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
