"""`make demo`: a three-tenant federation on this machine, start to finish.

The coordinator serves the default model; a SuperLink and three SuperNodes run the Flower app:
two tenants rewrite KJV into modern English on different books and average their adapters
(aggregation group "kjv") under Flower's SecAgg+, so that the server learns only their average, a
third rewrites modern English into King James English and keeps its adapter private. Each tenant
runs its steps in a long-lived worker next to its SuperNode (`pema-tenant worker`), as its pod
does. The federation runs as in production: TLS, SuperNodes authenticated by per-tenant keys,
groups assigned by the operator, replies limited to numbers. It prints the per-round table, each
tenant's BLEU/chrF before and after with sample generations (read from each tenant's own sample
log) and the PromQL figures. Every process it starts is stopped on exit, Ctrl-C or failure.

The process helpers here also serve the integration tests (tests/integration/test_federation.py).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, TypeVar

import redis

from coordinator.config import hash_token
from pema.data import Pair, read_pairs, shared_data_dir, write_pairs
from pema.models import default_model_dir
from pema.prompts import TASK_TEMPLATES
from tenant.federation import MEMORY_MODES

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATA = shared_data_dir()
REDIS_URL = "redis://127.0.0.1:6379/0"
# Flower's own processes colour their log lines unconditionally; the files we write stay plain.
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], T], what: str, timeout: float = 120.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def script(path: Path, *args: str | Path) -> None:
    """Run one of scripts/ (certificates, keys) with this interpreter; raise with its output."""
    done = subprocess.run(
        [sys.executable, str(path), *map(str, args)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{path.name} failed: {done.stderr.strip()}")


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_HOME=str(flwr_home),
        # The SuperLink and SuperNodes start flower-superexec / flwr-clientapp from PATH.
        PATH=f"{BIN}:{env.get('PATH', '')}",
        TOKENIZERS_PARALLELISM="false",
        # SuperExec looks for a new ClientApp/ServerApp task every second by default; every
        # message waits on that once.
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.1",
    )
    return env


def config_text(values: dict[str, Any], quote: str) -> str:
    """`key=value ...` as `--node-config` and `--run-config` read it: TOML values, so booleans
    are lower-case; strings in `quote` (`"` lets TOML escapes through, `'` keeps text literal)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return str(v) if isinstance(v, int | float) else f"{quote}{v}{quote}"

    return " ".join(f"{k}={value(v)}" for k, v in values.items())


def copy_plain(source: IO[str], out: IO[str]) -> None:
    """Copy a process's output into its log line by line (readers poll the file), uncoloured."""
    with out:
        for line in source:
            out.write(ANSI.sub("", line))
            out.flush()


class Processes:
    """Started processes, each in its own session: stopping one stops the children it started
    (ServerApp and ClientApp processes) too."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[subprocess.Popen[str]] = []

    def start(
        self, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        self.logs.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            text=True,
            errors="replace",
        )
        out = (self.logs / f"{name}.log").open("w")
        threading.Thread(target=copy_plain, args=(proc.stdout, out), daemon=True).start()
        self.procs.append(proc)
        return proc

    def crash(self, proc: subprocess.Popen[str]) -> None:
        """SIGKILL a process and its group, as a machine failure would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            # Whatever is left of its group (an orphaned ClientApp) goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        self.procs.clear()


def start_coordinator(
    procs: Processes, model: Path | None, tokens: dict[str, str], workdir: Path, threads: int = 1
) -> tuple[str, str]:
    """`pema-coordinator serve` for these tenants; returns (gRPC address, metrics URL)."""
    tenants = [{"id": t, "token_sha256": hash_token(tok)} for t, tok in tokens.items()]
    config = workdir / "tenants.json"
    config.write_text(json.dumps({"tenants": tenants}))
    port, metrics = free_port(), free_port()
    args = [str(BIN / "pema-coordinator"), "serve", "--port", str(port)]
    args += ["--metrics-host", "127.0.0.1", "--metrics-port", str(metrics)]
    args += ["--tenants", str(config), "--threads", str(threads)]
    if model is not None:
        args += ["--model", str(model)]
    proc = procs.start("coordinator", args, dict(os.environ))
    url = f"http://127.0.0.1:{metrics}/metrics"

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"the coordinator exited; see {workdir / 'coordinator.log'}")
        return http_ok(url)

    wait_for(ready, "the coordinator", timeout=300)
    return f"127.0.0.1:{port}", url


def start_worker(procs: Processes, name: str, sock: Path) -> Path:
    """`pema-tenant worker` on `sock` (tenant/worker.py), as each tenant pod runs one next to its
    SuperNode; returns `sock` once the worker serves there (it loads torch first: seconds)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    args = [str(BIN / "pema-tenant"), "worker", "--socket", str(sock)]
    proc = procs.start(f"worker-{name}", args, env)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker of {name} exited; see {procs.logs}/worker-{name}.log")
        # Accepting connections: a socket file alone may be one a killed worker left behind.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(sock))
            except OSError:
                return False
        return True

    wait_for(ready, f"the worker of {name}")
    return sock


@dataclass(frozen=True)
class Monitoring:
    """A local Prometheus and one metrics exporter per tenant (as each tenant pod runs one)."""

    prometheus: str  # its base URL
    files: dict[str, Path]  # tenant -> the metrics-file its node config names
    exporters: dict[str, str]  # tenant -> host:port of its /metrics


def start_metrics(
    procs: Processes, workdir: Path, also_scrape: list[str], tenants: list[str]
) -> Monitoring | None:
    """Prometheus scraping `also_scrape` (host:port of /metrics endpoints, e.g. the coordinator)
    and a `python -m tenant.metrics` exporter per tenant, each target labelled with its tenant as
    deploy/prometheus/prometheus.yml labels a tenant pod; nothing if Prometheus is not installed."""
    if shutil.which("prometheus") is None:
        return None
    files = {t: workdir / "metrics" / f"{t}.json" for t in tenants}
    exporters = {t: f"127.0.0.1:{free_port()}" for t in tenants}
    for t, address in exporters.items():
        procs.start(
            f"metrics-{t}",
            [
                sys.executable, "-m", "tenant.metrics", "--state", str(files[t]),
                "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
            ],
        )  # fmt: skip
    prom = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "pema-tenant",
                "static_configs": [
                    {"targets": [a], "labels": {"tenant": t}} for t, a in exporters.items()
                ],
            },
            {"job_name": "pema-coordinator", "static_configs": [{"targets": also_scrape}]},
        ],
    }
    (workdir / "prometheus.yml").write_text(json.dumps(config, indent=1))  # JSON is YAML
    procs.start(
        "prometheus",
        [
            "prometheus", f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom}",
        ],
    )  # fmt: skip
    for t, address in exporters.items():
        wait_for(lambda a=address: http_ok(f"http://{a}/metrics"), f"the metrics exporter of {t}")  # type: ignore[misc]
    wait_for(lambda: http_ok(f"http://127.0.0.1:{prom}/-/ready"), "Prometheus")
    return Monitoring(f"http://127.0.0.1:{prom}", files, exporters)


@dataclass
class Federation:
    """A SuperLink with SuperNodes, and `flwr run` of this project against it, as in production:
    TLS from a throwaway CA (scripts/dev_certs.py), SuperNode authentication with one key per
    tenant (scripts/supernode_keys.py) that the operator registers under the tenant's id, the
    Fleet API on a port of its own (coordinator/superlink.py), and the operator's tenants file
    mapping each tenant to its group."""

    procs: Processes
    workdir: Path
    port: int = field(default_factory=free_port)  # Control and Runtime APIs (operators)
    fleet_port: int = field(default_factory=free_port)  # Fleet API only (SuperNodes)
    groups: dict[str, str] = field(default_factory=dict)  # the operator's tenant -> group

    def __post_init__(self) -> None:
        self.home = self.workdir / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.certs = self.workdir / "certs"
        self.keys = self.workdir / "supernode-keys"
        self.registered: set[str] = set()
        script(ROOT / "scripts" / "dev_certs.py", self.certs, "--hosts", "127.0.0.1,localhost")
        self.ca = self.certs / "ca.crt"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "local-test"\n\n[superlink.local-test]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.ca}"\n'
        )
        self.env = flower_env(self.home)
        proc = self.procs.start(
            "superlink",
            [
                str(BIN / "python"), "-m", "coordinator.superlink",
                "--fleet-port", str(self.fleet_port), "--port", str(self.port),
                "--ssl-ca-certfile", str(self.ca), "--ssl-certfile", str(self.certs / "server.crt"),
                "--ssl-keyfile", str(self.certs / "server.key"), "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--database", str(self.workdir / "superlink.db"),
            ],
            self.env,
        )  # fmt: skip
        context = ssl.create_default_context(cafile=str(self.ca))

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"the SuperLink exited; see {self.procs.logs / 'superlink.log'}")
            return http_ok(f"https://127.0.0.1:{self.port}/health", context)

        wait_for(up, "the SuperLink")

    def register(self, tenant: str, group: str) -> None:
        """What the operator does once per tenant: register its public key under its id (the
        identity the ServerApp sees) and write down its group."""
        self.groups[tenant] = group
        if tenant in self.registered:
            return
        public = self.keys / f"{tenant}.pub"
        args = [str(BIN / "flwr"), "supernode", "register", str(public), "local-test"]
        done = subprocess.run(
            [*args, "--name", tenant], env=self.env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"flwr supernode register {tenant} failed: {done.stdout}{done.stderr}"
            )
        self.registered.add(tenant)

    def start_node(self, name: str, node_config: dict[str, Any]) -> subprocess.Popen[str]:
        """A SuperNode for one tenant, with its own key (made on first use); not waited for."""
        text = config_text(node_config, quote='"')
        tenant = str(node_config["tenant-id"])
        script(ROOT / "scripts" / "supernode_keys.py", self.keys, tenant)
        return self.procs.start(
            f"supernode-{name}",
            [
                str(BIN / "flower-supernode"), "--root-certificates", str(self.ca),
                "--auth-supernode-private-key", str(self.keys / tenant),
                "--superlink", f"127.0.0.1:{self.fleet_port}", "--port", str(free_port()),
                "--node-config", text,
            ],
            self.env,
        )  # fmt: skip

    def add_node(
        self, name: str, node_config: dict[str, Any], group: str | None = None
    ) -> subprocess.Popen[str]:
        """Register a tenant (its group: `group`, else what its node config opts into) and start
        its SuperNode; returns once the SuperLink has accepted the node, so that a run started
        afterwards includes it from round 1 (also when min-nodes lets it start without it)."""
        tenant = str(node_config["tenant-id"])
        script(ROOT / "scripts" / "supernode_keys.py", self.keys, tenant)
        opted = str(node_config.get("aggregation-group", ""))
        self.register(tenant, opted if group is None else group)
        log = self.procs.logs / f"supernode-{name}.log"
        procs: list[subprocess.Popen[str]] = []

        def registered() -> bool:
            if not procs or procs[-1].poll() is not None:
                if procs and "Failed to activate SuperNode" not in log.read_text(errors="replace"):
                    raise RuntimeError(f"SuperNode {name} exited; see {log}")
                # The SuperLink refuses a second activation of a key until it has marked the
                # node's previous process offline (a restart right after a crash): start again,
                # as Kubernetes restarts the container.
                if procs:
                    time.sleep(2)
                procs.append(self.start_node(name, node_config))
                return False
            # Flower logs its node id once the SuperLink has accepted the node.
            return "SuperNode ID:" in log.read_text(errors="replace")

        wait_for(registered, f"SuperNode {name} to connect to the SuperLink", timeout=180)
        return procs[-1]

    def run(
        self,
        run_config: dict[str, Any],
        timeout: float,
        echo: bool = False,
        on_line: Callable[[str], None] | None = None,
        name: str = "rounds",
        app: Path = ROOT,
    ) -> Path:
        """`flwr run` of the Flower app in `app` (this project) to the end; returns the round table
        (`name`.md, and `name`.jsonl). Raises with the log's tail on failure. `on_line` sees every
        line of the run's log as it arrives (tests inject faults with it)."""
        table = self.workdir / f"{name}.md"
        tenants = self.workdir / "tenants.json"
        doc = {"tenants": {t: {"group": g} for t, g in self.groups.items()}}
        tenants.write_text(json.dumps(doc))
        cfg = {**run_config, "round-table": str(table), "tenants-file": str(tenants)}
        text = config_text(cfg, quote="'")
        log = self.workdir / f"flwr-{name}.log"
        args = [str(BIN / "flwr"), "run", str(app), "local-test", "--stream"]
        with log.open("w") as out:
            proc = subprocess.Popen(
                [*args, "--run-config", text],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self.env,
                text=True,
                start_new_session=True,
            )
            try:
                assert proc.stdout is not None
                deadline = time.monotonic() + timeout
                for raw in proc.stdout:
                    line = ANSI.sub("", raw)
                    out.write(line)
                    if on_line is not None:
                        on_line(line)
                    if echo and ("[ROUND" in line or "rror" in line):
                        print("  " + line.split(":", 1)[-1].strip(), flush=True)
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"flwr run took more than {timeout:.0f} s")
                code = proc.wait()
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        if code != 0 or not table.is_file():
            tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
            raise RuntimeError(f"flwr run failed (exit {code}); {log}:\n{tail}")
        return table


def read_rows(table: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in table.with_suffix(".jsonl").read_text().splitlines()]


def book_slice(tsv: Path, book: str, n: int) -> list[Pair]:
    """The first n pairs of one book (the `ref` column names it)."""
    out: list[Pair] = []
    with tsv.open(newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if row["ref"].rsplit(" ", 1)[0] == book:
                out.append(Pair(row["source"], row["target"]))
                if len(out) == n:
                    break
    if not out:
        raise SystemExit(f"no pairs of {book} in {tsv}")
    return out


@dataclass(frozen=True)
class DemoTenant:
    id: str
    book: str
    template: str
    group: str
    reverse: bool = False  # modern -> King James: the kjv_web files with the columns swapped


TENANTS = [
    DemoTenant("kjv-genesis", "Genesis", TASK_TEMPLATES["kjv_web"], "kjv"),
    DemoTenant("kjv-exodus", "Exodus", TASK_TEMPLATES["kjv_web"], "kjv"),
    # A task the 135M model can learn from 120 pairs (it cannot learn Spanish from so few).
    DemoTenant("kjv-style", "Matthew", "Rewrite in King James English:\n{source}", "", True),
]


def tenant_files(
    t: DemoTenant, workdir: Path, pairs: int, valid: int, test: int
) -> dict[str, Path]:
    """The tenant's train slice of its book, and its valid/test pairs (swapped if reversed)."""
    data = DATA / "kjv_web"

    def prepared(split: str, got: list[Pair]) -> Path:
        if t.reverse:
            got = [Pair(p.target, p.source) for p in got]
        return write_pairs(workdir / f"{t.id}-{split}.tsv", got)

    return {
        "train": prepared("train", book_slice(data / "train.tsv", t.book, pairs)),
        "valid": prepared("valid", read_pairs(data / "valid.tsv", valid)),
        "test": prepared("test", read_pairs(data / "test.tsv", test)),
    }


def redis_up() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def read_samples(path: Path) -> dict[int, dict[str, Any]]:
    """A tenant's own sample log (its evaluate steps write it; the server never sees it)."""
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {int(r["round"]): r for r in rows}


def report(
    rows: list[dict[str, Any]], table: Path, workdir: Path, metrics: Monitoring | None
) -> None:
    print("\nPer-round table (" + str(table) + "):\n")
    print(table.read_text())
    last = max(r["round"] for r in rows)
    print("Before (untuned model) and after the last round, on each tenant's test sample")
    print("(the sample texts come from each tenant's own log, not from the server):\n")
    for t in TENANTS:
        first = next(r for r in rows if r.get("tenant") == t.id and r["round"] == 1)
        final = next(r for r in rows if r.get("tenant") == t.id and r["round"] == last)
        samples = read_samples(workdir / "adapters" / f"{t.id}.samples.jsonl")
        s1, sn = samples.get(1, {}), samples.get(last, {})
        task = "modern -> KJV" if t.reverse else "KJV -> modern"
        print(
            f"{t.id:12s} ({task}, {'group ' + t.group if t.group else 'private'}): "
            f"BLEU {first.get('untuned-bleu', float('nan')):5.1f} -> {final.get('bleu', float('nan')):5.1f}   "
            f"chrF {first.get('untuned-chrf', float('nan')):5.1f} -> {final.get('chrf', float('nan')):5.1f}"
        )
        print(f"    source:    {sn.get('source', '')}")
        print(f"    untuned:   {s1.get('untuned', '')}")
        print(f"    PEMA:      {sn.get('output', '')}")
        print(f"    reference: {sn.get('reference', '')}\n")
    if metrics:
        prom = metrics.prometheus
        exporters = ", ".join(f"{t} http://{a}/metrics" for t, a in metrics.exporters.items())
        print(f"Metrics: tenant exporters {exporters}, scraped by Prometheus at {prom}")
        print("(both stop with the demo; the table above and its .jsonl copy stay). PromQL now:")
        for query in (
            "pema_tenant_train_peak_memory_bytes / 2^20",
            "pema_tenant_train_step_seconds",
            "pema_tenant_round_seconds",
        ):
            values = ", ".join(
                f"{s['metric'].get('tenant')} {float(s['value'][1]):.3g}"
                for s in promql(prom, query)
            )
            print(f"  {query}: {values or '(not scraped yet)'}")
    else:
        print("Metrics: prometheus not installed (make metrics-deps).")


def promql(base: str, query: str) -> list[dict[str, Any]]:
    """An instant PromQL query against a Prometheus server."""
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"PromQL {query!r} failed: {body}")
    return list(body["data"]["result"])


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tenant.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rounds", type=int, default=3, help="federated rounds (default: 3)")
    p.add_argument(
        "--pairs", type=int, default=120, help="training pairs per tenant (default: 120)"
    )
    p.add_argument(
        "--valid-pairs", type=int, default=32, help="validation pairs per tenant (default: 32)"
    )
    p.add_argument(
        "--eval-sample", type=int, default=8, help="test pairs generated per round (default: 8)"
    )
    p.add_argument(
        "--local-epochs", type=int, default=2, help="epochs per tenant and round (default: 2)"
    )
    p.add_argument(
        "--memory-mode",
        choices=MEMORY_MODES,
        default="teacher-forced",
        help="how every tenant builds its memory, a privacy choice: teacher-forced sends the "
        "gold targets to the model owner (as token ids) and trains the better adapter; "
        "free-running keeps the targets on the tenant, the owner sees only the inputs and the "
        "model's own outputs (default: teacher-forced)",
    )
    p.add_argument(
        # SecAgg+ adds four ClientApp start-ups per round to the kjv tenants (README, Security).
        "--timeout",
        type=float,
        default=20 * 60,
        help="seconds for the whole run (default: 1200)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "runs" / time.strftime("demo-%Y%m%d-%H%M%S"),
        help="run folder: logs, adapters, tables (default: runs/demo-<date>-<time>)",
    )
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    workdir: Path = args.out.resolve()
    workdir.mkdir(parents=True)
    procs = Processes(workdir / "logs")
    try:
        print(f"demo in {workdir}: preparing the default model and data", flush=True)
        default_model_dir()  # converted from its GGUF once, before the processes need it
        tokens = {t.id: secrets.token_urlsafe(16) for t in TENANTS}
        # Tenants mostly wait on the coordinator's forward passes: it gets both cores.
        address, coord_metrics = start_coordinator(procs, None, tokens, workdir, threads=2)
        print(f"coordinator on {address} (metrics {coord_metrics})", flush=True)
        metrics = start_metrics(
            procs, workdir, [coord_metrics.split("/")[2]], [t.id for t in TENANTS]
        )
        cache = REDIS_URL if redis_up() else ""
        print(f"memory cache: {'Redis ' + cache if cache else 'on disk (Redis is not up)'}")
        fed = Federation(procs, workdir)
        for t in TENANTS:
            files = tenant_files(t, workdir, args.pairs, args.valid_pairs, args.eval_sample)
            # Each tenant's steps run in its worker, which keeps the head and memories warm.
            sock = start_worker(procs, t.id, workdir / "workers" / f"{t.id}.sock")
            node: dict[str, Any] = {
                "tenant-id": t.id,
                "token": tokens[t.id],
                "coordinator": address,
                **files,
                "max-valid-pairs": args.valid_pairs,
                "template": t.template.replace("\n", "\\n"),
                "adapter-dir": workdir / "adapters" / t.id,
                "cache-dir": workdir / "memories",
                "redis-url": cache,
                "aggregation-group": t.group,
                "memory-mode": args.memory_mode,
                "metrics-file": metrics.files[t.id] if metrics else "",
                "worker-socket": sock,
            }
            fed.add_node(t.id, node)
        print(f"SuperLink on 127.0.0.1:{fed.port}, {len(TENANTS)} SuperNodes; running "
              f"{args.rounds} rounds (fedavg under SecAgg+ within group kjv; kjv-style stays "
              f"private)", flush=True)  # fmt: skip
        table = fed.run(
            {
                "num-server-rounds": args.rounds,
                "aggregation": "fedavg",
                "secure-aggregation": True,  # the default, spelled out: the server sees sums only
                "local-epochs": args.local_epochs,
                "eval-sample-size": args.eval_sample,
                "min-nodes": len(TENANTS),
                "redis-ttl": 86400,  # the demo's memories expire from Redis after a day
            },
            timeout=args.timeout - (time.monotonic() - started),
            echo=True,
        )
        report(read_rows(table), table, workdir, metrics)
        print(f"\ndone in {time.monotonic() - started:.0f} s; logs and adapters in {workdir}")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError) as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
