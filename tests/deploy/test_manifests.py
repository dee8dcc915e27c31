"""Structural checks of deploy/: rendered Kubernetes manifests, scrape coverage, alert rules and
dashboard queries against the metrics the code exports, the Dockerfile, and the deploy helpers.

Rendering needs `kubectl` (its built-in kustomize); those tests skip without it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
Obj = dict[str, Any]
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
OUR_IMAGE = "registry.example.com/pema/pema-service:"
# Metrics the rules and dashboard may use that PEMA's code does not export, and who does.
EXTERNAL_METRICS = {
    "up": "Prometheus, per scrape target",
    "kube_pod_container_resource_limits": "kube-state-metrics",
}


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


check = load(DEPLOY / "check.py", "deploy_check")
new_tenant = load(DEPLOY / "k8s" / "new_tenant.py", "deploy_new_tenant")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (kustomize) is not installed")
    return check.render_all()


def all_objects(rendered: dict[str, list[Obj]]) -> list[tuple[str, Obj]]:
    return [(name, o) for name, objs in rendered.items() for o in objs]


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def by_name(objs: list[Obj], kind: str, name: str) -> Obj:
    (found,) = [o for o in of_kind(objs, kind) if o["metadata"]["name"] == name]
    return found


def workloads(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["kind"] in WORKLOADS]


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pod_labels(workload: Obj) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def flag(command: list[str], name: str) -> str | None:
    for arg in command:
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    return None


# --- every workload ---------------------------------------------------------------------------


def test_overlays_render_what_the_federation_needs(rendered: dict[str, list[Obj]]) -> None:
    for name, objs in rendered.items():
        kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
        for needed in [
            ("Deployment", "coordinator"),
            ("Deployment", "superlink"),
            ("Service", "pema-tenants"),
            ("StatefulSet", "redis"),
            ("PodDisruptionBudget", "coordinator"),
            ("NetworkPolicy", "default-deny"),
        ]:
            assert needed in kinds, (name, needed)
        assert all(
            o["metadata"].get("namespace") == "pema" for o in objs if o["kind"] != "Namespace"
        )
    tenants = {
        name: sorted(o["metadata"]["name"] for o in of_kind(objs, "StatefulSet"))
        for name, objs in rendered.items()
    }
    assert tenants["dev"] == ["redis", "tenant-es-a", "tenant-kjv-a"]
    assert tenants["prod+tenants"] == ["redis", "tenant-acme", "tenant-globex"]


def test_every_container_has_probes_limits_and_a_non_root_security_context(
    rendered: dict[str, list[Obj]],
) -> None:
    for overlay, w in [(n, o) for n, o in all_objects(rendered) if o["kind"] in WORKLOADS]:
        spec = pod_spec(w)
        where = f"{overlay} {w['kind']}/{w['metadata']['name']}"
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, where
        assert pod_sc.get("runAsUser", 0) != 0, where
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert spec.get("automountServiceAccountToken") is False, where
        for c in spec.get("initContainers", []) + spec["containers"]:
            cw = f"{where} container {c['name']}"
            limits = c.get("resources", {}).get("limits", {})
            requests = c.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= limits.keys(), cw
            assert {"cpu", "memory"} <= requests.keys(), cw
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, cw
            assert sc.get("allowPrivilegeEscalation") is False, cw
            assert sc.get("readOnlyRootFilesystem") is True, cw
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], cw
            assert not sc.get("privileged", False), cw
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), cw
            if image.startswith(OUR_IMAGE):
                # readOnlyRootFilesystem: Python and Flower write under /tmp and $HOME.
                mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
                assert "/tmp" in mounts or c["name"] == "tenants", cw
        for c in spec["containers"]:
            cw = f"{where} container {c['name']}"
            assert "readinessProbe" in c and "livenessProbe" in c, cw


def test_flower_telemetry_is_off_in_every_flower_container(rendered: dict[str, list[Obj]]) -> None:
    for _, w in [(n, o) for n, o in all_objects(rendered) if o["kind"] in WORKLOADS]:
        for c in pod_spec(w)["containers"]:
            if c["image"].startswith(OUR_IMAGE):
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert env.get("FLWR_TELEMETRY_ENABLED") == "0", c["name"]


# --- coordinator, SuperLink, tenants, Redis ---------------------------------------------------


def test_coordinator(rendered: dict[str, list[Obj]]) -> None:
    for overlay, objs in rendered.items():
        d = by_name(objs, "Deployment", "coordinator")
        spec = pod_spec(d)
        (c,) = spec["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert flag(c["command"], "--port") == str(ports["grpc"]) == "50051"
        assert flag(c["command"], "--metrics-port") == str(ports["metrics"]) == "9100"
        # Native gRPC probes on grpc.health.v1, on the plaintext health-only port (the kubelet
        # cannot speak TLS to 50051).
        assert flag(c["command"], "--health-port") == str(ports["health"]) != "50051"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == ports["health"], probe
        grace = float(flag(c["command"], "--grace-seconds") or 30)
        assert spec["terminationGracePeriodSeconds"] > grace
        model = flag(c["command"], "--model")
        init = {i["name"]: i for i in spec["initContainers"]}
        provision = init["provision-model"]["command"]
        assert provision[:2] == ["pema-coordinator", "provision-model"]
        cache = provision[provision.index("--cache-dir") + 1]
        assert model is not None and model.startswith(cache + "/models/")
        tenants_file = flag(c["command"], "--tenants")
        assert tenants_file == init["tenants"]["command"][-1]
        assert spec["affinity"]["podAntiAffinity"]
        pdb = by_name(objs, "PodDisruptionBudget", "coordinator")
        assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(d))
        if overlay.startswith("prod"):
            assert d["spec"]["replicas"] >= 2
            assert spec["affinity"]["podAntiAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"
            ]


def test_model_volume(rendered: dict[str, list[Obj]]) -> None:
    """The model and the dtype record live on one volume that provision-model fills and the
    coordinator reads; in prod it is a PVC, so a restart finds them instead of converting."""
    for overlay, objs in rendered.items():
        spec = pod_spec(by_name(objs, "Deployment", "coordinator"))
        volumes = {v["name"]: v for v in spec["volumes"]}
        (c,) = spec["containers"]
        init = {i["name"]: i for i in spec["initContainers"]}["provision-model"]
        cache = init["command"][init["command"].index("--cache-dir") + 1]
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        init_mounts = {m["name"]: m for m in init["volumeMounts"]}
        assert init_mounts["models"]["mountPath"] == cache == mounts["models"]["mountPath"]
        assert mounts["models"].get("readOnly") is True and not init_mounts["models"].get(
            "readOnly"
        )
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["PEMA_CACHE_DIR"] == cache  # the recorded dtype choice is read from there
        models = volumes["models"]
        if overlay == "dev":
            assert "emptyDir" in models
            continue
        assert set(models) == {"name", "persistentVolumeClaim"}, overlay
        pvc = by_name(objs, "PersistentVolumeClaim", models["persistentVolumeClaim"]["claimName"])
        # Replicas on different nodes (required anti-affinity) mount it at once.
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
        assert by_name(objs, "Deployment", "coordinator")["spec"]["replicas"] >= 2


def test_gpu_overlay(rendered: dict[str, list[Obj]]) -> None:
    gpu, prod = rendered["gpu"], rendered["prod"]
    d = by_name(gpu, "Deployment", "coordinator")
    spec = pod_spec(d)
    (c,) = spec["containers"]
    assert flag(c["command"], "--device") == "cuda"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert c["image"].startswith(OUR_IMAGE) and c["image"].endswith("-cuda")
    # Only the coordinator changes: everything else is prod's, CPU image included.
    (prod_c,) = pod_spec(by_name(prod, "Deployment", "coordinator"))["containers"]
    assert [a for a in c["command"] if not a.startswith("--device")] == prod_c["command"]
    assert flag(prod_c["command"], "--device") is None
    others = [o for o in gpu if (o["kind"], o["metadata"]["name"]) != ("Deployment", "coordinator")]
    assert others == [
        o for o in prod if (o["kind"], o["metadata"]["name"]) != ("Deployment", "coordinator")
    ]
    for w in workloads(others):
        for container in pod_spec(w).get("initContainers", []) + pod_spec(w)["containers"]:
            assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})


def test_superlink_binds_all_interfaces_keeps_state_and_probes_health(
    rendered: dict[str, list[Obj]],
) -> None:
    for objs in rendered.values():
        spec = pod_spec(by_name(objs, "Deployment", "superlink"))
        (c,) = spec["containers"]
        cmd = c["command"]
        # Flower's SuperLink with the Fleet API alone on 9092 and the Control API on 9093.
        assert cmd[:3] == ["python", "-m", "coordinator.superlink"]
        assert flag(cmd, "--fleet-port") == "9092" and flag(cmd, "--port") == "9093"
        assert "--insecure" not in cmd and "--enable-supernode-auth" in cmd
        assert "--disable-runtime-dependency-installation" in cmd
        assert flag(cmd, "--host") == "0.0.0.0"
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        tls = mounts["tls"]
        assert volumes["tls"]["secret"]["secretName"] == "superlink-tls"
        for name, file in (("--ssl-ca-certfile", "ca.crt"), ("--ssl-certfile", "tls.crt")):
            assert flag(cmd, name) == f"{tls}/{file}"
        assert flag(cmd, "--ssl-keyfile") == f"{tls}/tls.key"
        health = flag(cmd, "--health-server-address")
        assert health is not None and health.startswith("0.0.0.0:")
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == int(health.rsplit(":", 1)[1])
        database = flag(cmd, "--database")
        (state,) = [n for n, p in mounts.items() if database and database.startswith(p + "/")]
        assert "persistentVolumeClaim" in volumes[state]


def node_config_keys() -> set[str]:
    from tenant.steps import NodeConfig
    from tenant.worker_link import WORKER_KEYS

    return {f.alias or name for name, f in NodeConfig.model_fields.items()} | set(WORKER_KEYS)


def test_tenant_statefulsets(rendered: dict[str, list[Obj]]) -> None:
    known = node_config_keys()
    for overlay, objs in rendered.items():
        for sts in of_kind(objs, "StatefulSet"):
            if sts["metadata"]["name"] == "redis":
                continue
            tenant = pod_labels(sts)["pema.io/tenant"]
            where = f"{overlay} tenant {tenant}"
            assert sts["metadata"]["name"] == f"tenant-{tenant}"
            spec = pod_spec(sts)
            assert sts["spec"]["serviceName"] == "pema-tenants", where  # its scraped DNS name
            containers = {c["name"]: c for c in spec["containers"]}
            c = containers["supernode"]
            script = c["command"][-1]
            assert "flower-supernode" in script and "--superlink=superlink:9092" in script
            # TLS with the SuperLink's CA, and this tenant's own registered SuperNode key.
            assert "--insecure" not in script and "--root-certificates=" in script
            assert "--auth-supernode-private-key=/etc/flwr-auth/" in script
            secret_names = {v.get("secret", {}).get("secretName") for v in spec["volumes"]}
            assert {"superlink-tls", f"tenant-{tenant}-supernode-key"} <= secret_names
            # The node config: ConfigMap text plus the token and Redis URL from the Secret.
            volumes = {v["name"]: v for v in spec["volumes"]}
            cm = by_name(objs, "ConfigMap", volumes["node-config"]["configMap"]["name"])
            text = cm["data"]["node-config"] + ' token="t" redis-url="r"'
            pairs = dict(item.split("=", 1) for item in shlex.split(text))
            assert set(pairs) <= known, (where, set(pairs) - known)
            assert pairs["tenant-id"] == tenant
            assert pairs["coordinator"] == "coordinator:50051"
            # The steps run in the worker container, on the socket the node config names, in a
            # volume that only the supernode and worker containers share; the container that
            # talks to the federation mounts none of the tenant's data, and its state only
            # read-only (SecAgg+'s upload masks the adapter checkpoint the worker wrote).
            worker = containers["worker"]
            serve = ["pema-tenant", "worker", f"--socket={pairs['worker-socket']}"]
            assert worker["command"] == serve, where
            sharing = {
                name: {
                    m["name"]
                    for m in cont["volumeMounts"]
                    if pairs["worker-socket"].startswith(m["mountPath"] + "/")
                }
                for name, cont in containers.items()
            }
            assert sharing == {"supernode": {"worker"}, "worker": {"worker"}, "metrics": set()}
            assert "emptyDir" in volumes["worker"], where
            mounts = {m["name"]: m for m in c["volumeMounts"]}
            assert "data" not in mounts and mounts["state"].get("readOnly") is True, where
            assert not [e for e in worker.get("env", []) if "valueFrom" in e], where  # no secrets
            # The metrics container serves the file the steps record, read-only.
            exporter = containers["metrics"]
            assert flag(exporter["command"], "--state") == pairs["metrics-file"]
            assert flag(exporter["command"], "--port") == str(exporter["ports"][0]["containerPort"])
            (state_mount,) = [
                m
                for m in exporter["volumeMounts"]
                if pairs["metrics-file"].startswith(m["mountPath"])
            ]
            assert state_mount["name"] == "state" and state_mount["readOnly"] is True
            scheme = "rediss" if overlay.startswith("prod") else "redis"
            assert f"{scheme}://pema-{tenant}:$REDIS_PASSWORD@redis:6379/0" in script
            refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "valueFrom" in e}
            assert refs == {f"tenant-{tenant}-credentials"}, where
            # The adapter folder is on the tenant's own PersistentVolumeClaim.
            claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
            mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
            (adapter_mount,) = [p for p in mounts if pairs["adapter-dir"].startswith(p)]
            assert mounts[adapter_mount] in claims
            assert mounts["/data"] in claims
            # Hashes only in the shared Secrets: the coordinator's entry and the Redis user.
            secrets = {s["metadata"]["name"].rsplit("-", 1)[0]: s for s in of_kind(objs, "Secret")}
            entry = json.loads(b64(secrets["coordinator-tenants"]["data"][f"{tenant}.json"]))
            assert entry["id"] == tenant and re.fullmatch(r"[0-9a-f]{64}", entry["token_sha256"])
            acl = b64(secrets["redis-acl"]["data"][f"{tenant}.acl"])
            assert acl.startswith(f"user pema-{tenant} on #") and f"~pema:{tenant}:*" in acl
            assert ">" not in acl  # no clear-text password


def mounted_file(spec: Obj, container: Obj, path: str) -> Obj:
    """The volume (a Secret's) that `path` in the container comes from."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    (volume,) = [
        volumes[m["name"]]
        for m in container["volumeMounts"]
        if path.startswith(m["mountPath"] + "/")
    ]
    return volume


def test_tls_is_on_in_prod_and_off_in_dev(rendered: dict[str, list[Obj]]) -> None:
    """Prod: the coordinator serves gRPC over TLS, Redis speaks only TLS, and every tenant
    verifies both against the CA mounted from a Secret. Dev stays plaintext and says so."""
    for overlay, objs in rendered.items():
        spec = pod_spec(by_name(objs, "Deployment", "coordinator"))
        (c,) = spec["containers"]
        argv = c["command"] + c.get("args", [])
        redis_sts = by_name(objs, "StatefulSet", "redis")
        (r,) = pod_spec(redis_sts)["containers"]
        conf_name = next(
            v["configMap"]["name"] for v in pod_spec(redis_sts)["volumes"] if "configMap" in v
        )
        conf = dict(
            line.split(None, 1)
            for line in by_name(objs, "ConfigMap", conf_name)["data"]["redis.conf"].splitlines()
            if line and not line.startswith("#")
        )
        tenants = [
            s for s in of_kind(objs, "StatefulSet") if s["metadata"]["name"].startswith("tenant-")
        ]
        if overlay == "dev":
            assert flag(argv, "--tls-cert") is None and conf["port"] == "6379"
            assert (
                "plaintext"
                in (DEPLOY / "k8s" / "overlays" / overlay / "kustomization.yaml").read_text()
            )
            continue
        for name in ("--tls-cert", "--tls-key"):
            path = flag(argv, name)
            assert path, name
            assert mounted_file(spec, c, path)["secret"]["secretName"] == "coordinator-tls"
        assert conf["port"] == "0" and conf["tls-port"] == "6379"
        for key in ("tls-cert-file", "tls-key-file", "tls-ca-cert-file"):
            secret = mounted_file(pod_spec(redis_sts), r, conf[key])["secret"]
            assert secret["secretName"] == "redis-tls", key
        assert "--tls" in r["readinessProbe"]["exec"]["command"]
        for sts in tenants:
            containers = {c["name"]: c for c in pod_spec(sts)["containers"]}
            volumes = {v["name"]: v for v in pod_spec(sts)["volumes"]}
            cm = by_name(objs, "ConfigMap", volumes["node-config"]["configMap"]["name"])
            pairs = dict(item.split("=", 1) for item in shlex.split(cm["data"]["node-config"]))
            assert "rediss://" in containers["supernode"]["command"][-1]
            # The worker runs the steps: it dials the coordinator and Redis.
            for key in ("coordinator-tls-ca", "redis-tls-ca"):
                ca = mounted_file(pod_spec(sts), containers["worker"], pairs[key])
                assert ca["secret"]["secretName"] == "pema-tls-ca", key


def b64(value: str) -> str:
    import base64

    return base64.b64decode(value).decode()


def test_redis_persistence_maxmemory_and_acl(rendered: dict[str, list[Obj]]) -> None:
    for overlay, objs in rendered.items():
        sts = by_name(objs, "StatefulSet", "redis")
        conf_name = next(
            v["configMap"]["name"] for v in pod_spec(sts)["volumes"] if "configMap" in v
        )
        conf = by_name(objs, "ConfigMap", conf_name)["data"]["redis.conf"]
        settings = dict(
            line.split(None, 1) for line in conf.splitlines() if line and not line.startswith("#")
        )
        assert settings["appendonly"] == "yes"
        assert settings["maxmemory-policy"] == "allkeys-lru"
        assert settings["aclfile"] == "/run/redis/users.acl"
        maxmemory = int(settings["maxmemory"].removesuffix("mb").removesuffix("gb")) * (
            1024 if settings["maxmemory"].endswith("gb") else 1
        )
        (c,) = pod_spec(sts)["containers"]
        limit = c["resources"]["limits"]["memory"]
        limit_mb = int(limit[:-2]) * (1024 if limit.endswith("Gi") else 1)
        assert maxmemory < limit_mb, overlay  # room for AOF rewrite and buffers
        assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


# --- network policies -------------------------------------------------------------------------


def policies_for(objs: list[Obj], labels: dict[str, str], kind: str) -> list[Obj]:
    return [
        p
        for p in of_kind(objs, "NetworkPolicy")
        if kind in p["spec"]["policyTypes"]
        and selects(p["spec"]["podSelector"].get("matchLabels", {}), labels)
    ]


def _peer_matches(peer: Obj, pod: dict[str, str], namespace: dict[str, str]) -> bool:
    """A NetworkPolicy peer (from/to) admits a pod with these labels in a namespace with these
    labels (a peer without namespaceSelector means the policy's own namespace, "pema")."""
    if "ipBlock" in peer:
        return False  # pod traffic inside the cluster is never addressed by ipBlock here
    ns_sel = peer.get("namespaceSelector")
    if ns_sel is None:
        in_ns = namespace.get("kubernetes.io/metadata.name") == "pema"
    else:
        in_ns = selects(ns_sel.get("matchLabels", {}), namespace)
    pod_sel = peer.get("podSelector")
    return in_ns and (pod_sel is None or selects(pod_sel.get("matchLabels", {}), pod))


def _admits(
    rules: list[Obj], peers_key: str, pod: dict[str, str], ns: dict[str, str], port: int
) -> bool:
    for rule in rules:
        ports = {p["port"] for p in rule.get("ports", [])}
        if ports and port not in ports:
            continue
        if any(_peer_matches(peer, pod, ns) for peer in rule.get(peers_key, [])):
            return True
    return False


def reaches(
    objs: list[Obj], src: dict[str, str], src_ns: dict[str, str], dst: dict[str, str], port: int
) -> bool:
    """Whether the policies (default deny in both directions) let a pod with labels `src` in a
    namespace labelled `src_ns` open a TCP connection to a pema pod labelled `dst` on `port`."""
    pema = {"kubernetes.io/metadata.name": "pema"}
    ingress = [r for p in policies_for(objs, dst, "Ingress") for r in p["spec"].get("ingress", [])]
    if not _admits(ingress, "from", src, src_ns, port):
        return False
    if src_ns != pema:
        return True  # egress of other namespaces is their own policies' business
    egress = [r for p in policies_for(objs, src, "Egress") for r in p["spec"].get("egress", [])]
    return _admits(egress, "to", dst, pema, port)


def test_only_operators_reach_the_superlink_control_port(rendered: dict[str, list[Obj]]) -> None:
    """Tenant pods reach the SuperLink's Fleet port and not its Control port (where runs are
    submitted, whose ClientApps then run in every tenant's pod); an operator namespace's pods
    reach the Control port."""
    pema = {"kubernetes.io/metadata.name": "pema"}
    operator_ns = {"kubernetes.io/metadata.name": "ops", "pema.io/role": "operator"}
    for overlay, objs in rendered.items():
        superlink = pod_labels(by_name(objs, "Deployment", "superlink"))
        (c,) = pod_spec(by_name(objs, "Deployment", "superlink"))["containers"]
        fleet, control = (
            int(flag(c["command"], "--fleet-port") or 0),
            int(flag(c["command"], "--port") or 0),
        )
        tenants = [
            pod_labels(s) for s in of_kind(objs, "StatefulSet") if s["metadata"]["name"] != "redis"
        ]
        for tenant in tenants:  # prod lists none until new_tenant.py adds them
            assert reaches(objs, tenant, pema, superlink, fleet), (overlay, tenant)
            assert not reaches(objs, tenant, pema, superlink, control), (overlay, tenant)
            # Nor from any other namespace under the tenant's pod labels.
            assert not reaches(
                objs, tenant, {"kubernetes.io/metadata.name": "x"}, superlink, control
            )
        assert reaches(objs, {"app": "flwr-cli"}, operator_ns, superlink, control), overlay
        assert not reaches(objs, {"app": "flwr-cli"}, pema, superlink, control), overlay


def test_network_policies(rendered: dict[str, list[Obj]]) -> None:
    for objs in rendered.values():
        deny = by_name(objs, "NetworkPolicy", "default-deny")
        assert deny["spec"]["podSelector"] == {} and "ingress" not in deny["spec"]
        assert "egress" not in deny["spec"]
        for sts in of_kind(objs, "StatefulSet"):
            labels = pod_labels(sts)
            if labels.get("app.kubernetes.io/component") != "tenant":
                continue
            # Only Prometheus (the monitoring namespace) reaches a tenant pod, on its metrics port.
            for p in policies_for(objs, labels, "Ingress"):
                for rule in p["spec"].get("ingress", []):
                    assert [x["port"] for x in rule["ports"]] == [9102], p
                    assert rule["from"] == [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                            }
                        }
                    ], p
            # A tenant reaches DNS, the coordinator, the SuperLink and Redis; nothing else.
            reached = set()
            for p in policies_for(objs, labels, "Egress"):
                for rule in p["spec"].get("egress", []):
                    for peer in rule["to"]:
                        sel = peer.get("podSelector", {}).get("matchLabels", {})
                        if "namespaceSelector" in peer:
                            assert sel == {"k8s-app": "kube-dns"}
                            reached.add("dns")
                        else:
                            reached.add(sel["app.kubernetes.io/component"])
            assert reached == {"dns", "coordinator", "superlink", "redis"}
        # Metrics ports admit only the monitoring namespace.
        metrics_ports = {
            p["containerPort"]
            for w in workloads(objs)
            for c in pod_spec(w)["containers"]
            for p in c.get("ports", [])
            if p["name"] == "metrics"
        }
        for p in of_kind(objs, "NetworkPolicy"):
            for rule in p["spec"].get("ingress", []):
                ports = {x["port"] for x in rule.get("ports", [])}
                if not ports & metrics_ports:
                    continue
                for peer in rule["from"]:
                    ns = peer.get("namespaceSelector", {}).get("matchLabels", {})
                    assert ns == {"kubernetes.io/metadata.name": "monitoring"}, p
                    assert "podSelector" not in peer, p


# --- scraping ---------------------------------------------------------------------------------


def metrics_services(objs: list[Obj]) -> dict[str, Obj]:
    """Services exposing a pod port named `metrics`, by name; every such pod port has one."""
    found: dict[str, Obj] = {}
    for w in workloads(objs):
        for c in pod_spec(w)["containers"]:
            if not any(p["name"] == "metrics" for p in c.get("ports", [])):
                continue
            services = [
                s
                for s in of_kind(objs, "Service")
                if selects(s["spec"].get("selector", {}), pod_labels(w))
                and any(p["name"] == "metrics" for p in s["spec"]["ports"])
            ]
            assert services, f"no Service exposes {w['metadata']['name']}'s metrics port"
            found.update({s["metadata"]["name"]: s for s in services})
    return found


def test_every_metrics_port_is_scraped(rendered: dict[str, list[Obj]]) -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    srv_names = {
        name
        for job in prom["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
        for name in sd["names"]
    }
    for overlay, objs in rendered.items():
        services = metrics_services(objs)
        assert "coordinator-metrics" in services
        if any(o["metadata"]["name"].startswith("tenant-") for o in of_kind(objs, "StatefulSet")):
            assert "pema-tenants" in services
        # Without the Operator: prometheus.yml names an SRV record for each workload's metrics.
        scraped = {n.split(".")[2] for n in srv_names if n.startswith("_metrics._tcp.")}
        workload_of = {
            name: s["spec"]["selector"]["app.kubernetes.io/component"]
            for name, s in services.items()
        }
        assert set(workload_of.values()) == {workload_of[s] for s in scraped & services.keys()}, (
            overlay
        )
        for name in scraped & services.keys():
            assert services[name]["spec"].get("clusterIP") == "None"  # one target per pod
        # With the Operator (prod): a ServiceMonitor selects a Service for each of them.
        monitors = of_kind(objs, "ServiceMonitor")
        if overlay.startswith("prod"):
            covered = set()
            for m in monitors:
                assert m["spec"]["jobLabel"] == "pema.io/job"
                for s in services.values():
                    if selects(m["spec"]["selector"]["matchLabels"], s["metadata"]["labels"]):
                        ports = {p["name"] for p in s["spec"]["ports"]}
                        assert {e["port"] for e in m["spec"]["endpoints"]} <= ports
                        covered.add(workload_of[s["metadata"]["name"]])
            assert covered == set(workload_of.values())
            jobs = {job["job_name"] for job in prom["scrape_configs"]}
            job_labels = {
                s["metadata"]["labels"].get("pema.io/job") for s in of_kind(objs, "Service")
            } - {None}
            assert job_labels == jobs  # same job names with or without the Operator
            # The tenant label comes from the pod, and a pod cannot override it.
            (tenant_monitor,) = [m for m in monitors if m["metadata"]["name"] == "pema-tenant"]
            for e in tenant_monitor["spec"]["endpoints"]:
                assert not e.get("honorLabels")
                assert {
                    "sourceLabels": ["__meta_kubernetes_pod_label_pema_io_tenant"],
                    "targetLabel": "tenant",
                } in e["relabelings"]
            (rule,) = of_kind(objs, "PrometheusRule")
            rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
            assert rule["spec"] == rules
    tenants = next(j for j in prom["scrape_configs"] if j["job_name"] == "pema-tenant")
    assert not tenants.get("honor_labels")
    (relabel, _) = tenants["relabel_configs"]
    assert relabel["target_label"] == "tenant"
    assert re.fullmatch(relabel["regex"], "tenant-kjv-a-0.pema-tenants.pema.svc.cluster.local.")


# --- metric names: rules and dashboard vs the code --------------------------------------------

PROMQL_WORDS = {
    # functions
    "abs", "absent", "absent_over_time", "avg", "avg_over_time", "ceil", "clamp_max",
    "clamp_min", "count", "count_over_time", "delta", "deriv", "exp", "floor",
    "histogram_quantile", "increase", "irate", "label_replace", "label_values", "ln",
    "max", "max_over_time", "min", "min_over_time", "quantile", "rate", "round",
    "scalar", "sort", "stddev", "sum", "sum_over_time", "time", "topk", "bottomk", "vector",
    # keywords
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (or a Grafana query using $variables)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\$\{?\w+\}?", "", s)  # Grafana variables
    s = re.sub(r"label_values\(\s*([^,()]+?)\s*,\s*\w+\s*\)", r"\1", s)  # Grafana's
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # ranges
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    s = re.sub(r"\b\d+(\.\d+)?(e[+-]?\d+)?\b", "", s)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", s))
    return {w for w in words if w not in PROMQL_WORDS and not w.startswith("__")}


def exported_metrics() -> set[str]:
    """Series names the code exports, read from its prometheus_client registries."""
    import tenant.metrics as tm
    from coordinator.metrics import Metrics

    families = list(Metrics(["t"]).registry.collect())
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state.json"
        tm.record_round(state, tm.RoundFigures(1, 0.1, 1.0, 0.5, True, 0.3))
        tm.record_quality(state, 1.0, 2.0)
        assert tm.read_state(state).keys() == tm.SERIES.keys() - {"pema_tenant_cache_misses"}
        families += tm.registry(state).collect()  # the tenant exporter's /metrics
    names: set[str] = set()
    for family in families:
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count", "_created")}
        elif family.type == "info":
            names.add(family.name + "_info")
        else:
            names.add(family.name)
    return names


def rule_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def dashboard() -> Obj:
    data: Obj = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    return data


def dashboard_exprs() -> list[str]:
    d = dashboard()
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in d["templating"]["list"] if "definition" in v]
    return exprs


def test_metric_name_parser() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, tenant) (rate(a_bucket{tenant=~"$tenant", '
        'method!="Decode"}[5m]))) > on (tenant) 0.9 * max by (tenant) (label_replace(b, "t", '
        '"$1", "pod", "x-(.+)")) and on () time() - c > 3 * 3600'
    )
    assert metric_names("label_values(d, tenant)") == {"d"}
    assert metric_names(expr) == {"a_bucket", "b", "c"}


def test_rules_and_dashboard_query_only_exported_metrics() -> None:
    exported = exported_metrics()
    assert "pema_coordinator_requests_total" in exported
    assert "pema_tenant_train_peak_memory_bytes" in exported
    used: dict[str, set[str]] = {}
    for source, exprs in (("rules.yml", rule_exprs()), ("dashboard.json", dashboard_exprs())):
        for expr in exprs:
            for name in metric_names(expr):
                used.setdefault(name, set()).add(source)
    unknown = {n: s for n, s in used.items() if n not in exported and n not in EXTERNAL_METRICS}
    assert not unknown, f"queried but not exported by the code: {unknown}"
    # The per-tenant figures the operators watch are all on the dashboard.
    dash = " ".join(dashboard_exprs())
    for name in (
        "pema_tenant_train_peak_memory_bytes",
        "pema_tenant_round_seconds",
        "pema_coordinator_request_seconds_bucket",
        "pema_coordinator_tokens_total",
        "pema_coordinator_requests_total",
    ):
        assert name in dash


def test_dashboard_has_per_tenant_panels() -> None:
    d = dashboard()
    titles = {p["title"] for p in d["panels"]}
    for needed in ("Training peak memory", "Training latency", "Errors (calls not OK)"):
        assert needed in titles
    assert any(t.startswith("Serving latency") for t in titles)
    assert any(t.startswith("Throughput") for t in titles)
    assert {v["name"] for v in d["templating"]["list"]} == {"datasource", "tenant"}
    for p in d["panels"]:
        for t in p.get("targets", []):
            if "pema_tenant_" in t["expr"] or "{{tenant}}" in t["legendFormat"]:
                assert "$tenant" in t["expr"] or "_unauthenticated" in t["expr"], p["title"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))


def test_rules_cover_the_required_alerts() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {
        "PemaCoordinatorDown",
        "PemaCoordinatorErrorRatio",
        "PemaCoordinatorBadTokens",
        "PemaCoordinatorLatencyP99",
        "PemaTenantTrainingMemoryNearLimit",
        "PemaTenantMissingFromRounds",
    } <= alerts
    # Each alert has a promtool unit test (deploy/check.py runs them).
    tests = yaml.safe_load((DEPLOY / "prometheus" / "rules_test.yml").read_text())
    tested = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"]}
    assert {"PemaCoordinatorErrorRatio", "PemaCoordinatorBadTokens"} <= tested
    error_ratio = next(
        r["expr"]
        for g in rules["groups"]
        for r in g["rules"]
        if r.get("alert") == "PemaCoordinatorErrorRatio"
    )
    assert 'tenant!="_unauthenticated"' in error_ratio and "RESOURCE_EXHAUSTED" not in error_ratio
    readme = (DEPLOY / "README.md").read_text()
    for alert in alerts:
        assert alert in readme, f"deploy/README.md does not explain {alert}"


# --- the image --------------------------------------------------------------------------------


def test_dockerfile() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) >= 2
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python(:3\.11\.\d+-slim\S*|@sha256:[0-9a-f]{64})", base[1])
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", stages[0], re.M)
    assert '"torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"' in stages[0]
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.M)
    final = stages[-1]
    assert "COPY --from=builder /opt/venv /opt/venv" in final
    assert not re.search(r"apt-get|build-essential|gcc|pip install", final)
    user = re.findall(r"^USER (\S+)$", final, re.M)
    assert user and not user[-1].startswith(("0", "root"))
    assert "FLWR_TELEMETRY_ENABLED=0" in final
    # Every entry point the manifests run comes from the project or flwr, installed in the venv.
    scripts = set(re.findall(r"^(pema-\w+) = ", (ROOT / "pyproject.toml").read_text(), re.M))
    assert {"pema-coordinator", "pema-tenant"} <= scripts
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text()
    assert "!deploy/docker/merge_tenants.py" in ignore


# --- helpers: merge_tenants, provision-model, new_tenant --------------------------------------


def test_merge_tenants_output_loads_in_the_coordinator(tmp_path: Path) -> None:
    from coordinator.config import load_tenants

    merge = load(DEPLOY / "docker" / "merge_tenants.py", "deploy_merge_tenants")
    src = tmp_path / "tenants.d"
    src.mkdir()
    for tid in ("b", "a"):
        entry = {
            "id": tid,
            "token_sha256": f"{ord(tid):064x}",
            "limits": {"max_decode_sessions": 2},
        }
        (src / f"{tid}.json").write_text(json.dumps(entry))
    (src / "README").write_text("ignored")
    out = tmp_path / "tenants.json"
    assert merge.main([str(src), str(out)]) == 0
    tenants = load_tenants(out)
    assert [t.id for t in tenants] == ["a", "b"]
    assert tenants[0].limits.max_decode_sessions == 2
    (src / "again.json").write_text(json.dumps({"id": "a", "token_sha256": "0" * 64}))
    with pytest.raises(SystemExit, match="appears twice"):
        merge.main([str(src), str(out)])


def test_provision_model_prints_the_model_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from coordinator.cli import main
    from pema.models import DEFAULT_MODEL_NAME

    target = tmp_path / "models" / DEFAULT_MODEL_NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # already provisioned: nothing to convert
    assert main(["provision-model", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    # On a CPU node the dtype choice is recorded next to the model, once.
    record = tmp_path / "dtype-choices.json"
    assert record.is_file()
    before = record.read_bytes()
    assert main(["provision-model", "--cache-dir", str(tmp_path)]) == 0
    assert record.read_bytes() == before


def test_new_tenant_adds_and_rotates_without_touching_others(tmp_path: Path) -> None:
    k8s = tmp_path / "k8s"
    shutil.copytree(DEPLOY / "k8s", k8s, ignore=shutil.ignore_patterns("credentials.env"))
    overlay = k8s / "overlays" / "dev"
    before = {p: p.read_bytes() for p in (overlay / "tenants" / "kjv-a").iterdir()}
    out = new_tenant.write_tenant(overlay, "new-one", group="kjv", token="tok", redis_password="pw")
    assert (overlay / "kustomization.yaml").read_text().count("  - tenants/new-one\n") == 1
    creds = (out / "credentials.env").read_text()
    assert creds == "PEMA_TOKEN=tok\nREDIS_PASSWORD=pw\n"
    assert (out / "credentials.env").stat().st_mode & 0o077 == 0
    entry = json.loads((out / "tenant.json").read_text())
    assert entry["token_sha256"] == __import__("hashlib").sha256(b"tok").hexdigest()
    with pytest.raises(SystemExit, match="--rotate"):
        new_tenant.write_tenant(overlay, "new-one")
    new_tenant.write_tenant(overlay, "new-one", rotate=True, token="tok2", redis_password="pw2")
    assert json.loads((out / "tenant.json").read_text())["token_sha256"] != entry["token_sha256"]
    assert (overlay / "kustomization.yaml").read_text().count("tenants/new-one") == 1
    assert {p: p.read_bytes() for p in (overlay / "tenants" / "kjv-a").iterdir()} == before
    with pytest.raises(SystemExit, match="must match"):
        new_tenant.write_tenant(overlay, "Bad_Id")


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_generated_acl_file_loads_in_redis_and_limits_the_tenant(tmp_path: Path) -> None:
    import socket
    import time

    import redis

    base = (DEPLOY / "k8s" / "base" / "redis-base.acl").read_text()
    acl = tmp_path / "users.acl"
    acl.write_text(base + new_tenant.acl_line("t1", "secret-pw") + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--aclfile", str(acl), "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        anon = redis.Redis(port=port)
        for _ in range(100):
            try:
                assert anon.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        with pytest.raises(redis.exceptions.NoPermissionError):
            anon.get("pema:t1:x")  # the default user may only PING (the readiness probe)
        t1 = redis.Redis(port=port, username="pema-t1", password="secret-pw")
        t1.set("pema:t1:x", b"1")
        assert t1.get("pema:t1:x") == b"1"
        with pytest.raises(redis.exceptions.NoPermissionError):
            t1.get("pema:t2:x")
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port, username="pema-t1", password="wrong").ping()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
