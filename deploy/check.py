"""Offline checks of everything under deploy/ (`make deploy-check` runs this).

1. render each overlay with `kubectl kustomize` (dev, prod and gpu as committed, and prod with
   two tenants added by new_tenant.py in a scratch copy, since prod commits none);
2. validate every rendered object with `kubernetes-validate --strict` against Kubernetes
   KUBERNETES_VERSION; Prometheus Operator objects (ServiceMonitor, PrometheusRule) have no
   schema there (CRDs) and are checked structurally by tests/deploy/test_manifests.py instead;
3. yamllint on deploy/ (deploy/.yamllint);
4. `promtool check rules`, `promtool test rules` (prometheus/rules_test.yml: which alerts fire
   on given series) and `promtool check config`;
5. generated files match their sources: grafana/dashboard.json (grafana/build_dashboard.py) and
   the PrometheusRule (prometheus/rules.yml);
6. pytest tests/deploy: probes, limits, securityContext, scraped metrics ports, and every metric
   the dashboard and the rules query is one the code exports.

`python deploy/check.py --write` regenerates the files of step 5 instead of checking them.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
K8S = DEPLOY / "k8s"
OVERLAYS = ("dev", "prod", "gpu")
# kubectl here is v1.32; kubernetes-validate ships strict schemas for it.
KUBERNETES_VERSION = "1.32.0"
CRD_GROUPS = ("monitoring.coreos.com/",)
RULE_FILE = DEPLOY / "prometheus" / "rules.yml"
PROMETHEUS_RULE = K8S / "components" / "prometheus-operator" / "prometheusrule.yaml"
BIN = Path(sys.executable).parent


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kustomize(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(path)], check=True, capture_output=True, text=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def render_all() -> dict[str, list[dict[str, Any]]]:
    """Rendered objects per overlay name; "prod+tenants" has two generated tenants."""
    rendered = {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}
    new_tenant = load_module(K8S / "new_tenant.py", "new_tenant")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "k8s"
        shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("credentials.env"))
        for tenant, group in (("acme", "kjv"), ("globex", "")):
            new_tenant.write_tenant(copy / "overlays" / "prod", tenant, group=group)
        rendered["prod+tenants"] = kustomize(copy / "overlays" / "prod")
    return rendered


def prometheus_rule() -> str:
    rules = yaml.safe_load(RULE_FILE.read_text())
    obj = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "pema", "labels": {"app.kubernetes.io/name": "pema"}},
        "spec": rules,
    }
    head = "# Generated from deploy/prometheus/rules.yml by `python deploy/check.py --write`.\n"
    return head + yaml.safe_dump(obj, sort_keys=False, width=100)


def generated() -> dict[Path, str]:
    dashboard = load_module(DEPLOY / "grafana" / "build_dashboard.py", "build_dashboard")
    return {dashboard.OUT: dashboard.render(), PROMETHEUS_RULE: prometheus_rule()}


def run(step: str, args: list[str]) -> bool:
    shown = " ".join(args)
    print(f"== {step}: {shown if len(shown) < 200 else shown[:200] + ' …'}", flush=True)
    ok = subprocess.run(args, cwd=ROOT).returncode == 0
    print(f"   {'ok' if ok else 'FAILED'}", flush=True)
    return ok


def validate(rendered: dict[str, list[dict[str, Any]]], workdir: Path) -> bool:
    files: list[str] = []
    skipped: list[str] = []
    for overlay, objs in rendered.items():
        for i, obj in enumerate(objs):
            ident = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
            if obj["apiVersion"].startswith(CRD_GROUPS):
                skipped.append(ident)
                continue
            f = workdir / f"{overlay.replace('+', '-')}-{i:03d}-{obj['kind']}.yaml"
            f.write_text(yaml.safe_dump(obj))
            files.append(str(f))
    print(f"   skipped (CRDs, checked by tests/deploy): {', '.join(skipped) or 'none'}")
    return run(
        f"kubernetes-validate ({len(files)} objects)",
        [str(BIN / "kubernetes-validate"), "--strict", "--quiet", "-k", KUBERNETES_VERSION, *files],
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--write", action="store_true", help="regenerate the generated files")
    a = p.parse_args(argv)
    if a.write:
        for path, text in generated().items():
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    results: list[bool] = []
    print("== kubectl kustomize: " + ", ".join(OVERLAYS) + ", prod with two new tenants")
    rendered = render_all()
    for name, objs in rendered.items():
        print(f"   {name}: {len(objs)} objects")
    with tempfile.TemporaryDirectory() as tmp:
        results.append(validate(rendered, Path(tmp)))
    results.append(
        run("yamllint", [str(BIN / "yamllint"), "--strict", "-c", "deploy/.yamllint", "deploy"])
    )
    results.append(run("promtool rules", ["promtool", "check", "rules", str(RULE_FILE)]))
    rule_tests = str(RULE_FILE.with_name("rules_test.yml"))
    results.append(run("promtool rule tests", ["promtool", "test", "rules", rule_tests]))
    prom = DEPLOY / "prometheus" / "prometheus.yml"
    results.append(run("promtool config", ["promtool", "check", "config", str(prom)]))
    print("== generated files match their sources")
    for path, text in generated().items():
        same = path.is_file() and path.read_text() == text
        print(f"   {path.relative_to(ROOT)}: {'ok' if same else 'STALE (deploy/check.py --write)'}")
        results.append(same)
    results.append(run("pytest", [sys.executable, "-m", "pytest", "-q", "tests/deploy"]))
    failed = results.count(False)
    print(f"deploy-check: {'all passed' if not failed else f'{failed} check(s) FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
