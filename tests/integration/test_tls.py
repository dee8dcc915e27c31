"""A tenant against a TLS and a mutual-TLS coordinator (real gRPC servers, a tiny model), with
certificates made by scripts/dev_certs.py, and every TLS misconfiguration named in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.cli import main as coordinator_main
from coordinator.config import CoordinatorConfig, Tenant, TlsConfig, hash_token
from coordinator.server import CoordinatorServer, load_model
from pema.errors import PemaError
from proto.gen.pemaservice.v1 import coordinator_pb2 as pb
from proto.gen.pemaservice.v1 import coordinator_pb2_grpc as pb_grpc
from tenant.cli import main as tenant_main
from tenant.coordinator_client import (
    ClientConfig,
    CoordinatorClient,
    CoordinatorTlsError,
    TlsOptions,
)
from tenant.memory_store import CacheError
from tenant.redis_store import RedisMemoryStore, tenant_acl_rules

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "tls-tenant-token"
TENANT = "acme"


def make_certs(out: Path, clients: str = "") -> Path:
    """Run the script exactly as a developer would."""
    args = [sys.executable, str(ROOT / "scripts" / "dev_certs.py"), str(out)]
    subprocess.run([*args, "--clients", clients] if clients else args, check=True)
    return out


@dataclass
class Servers:
    certs: Path  # ca.crt, server.*, acme.* (a client cert this CA signed)
    other: Path  # another CA, and a client cert it signed
    plain: str
    tls: str
    mtls: str
    tls_health_port: int


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Servers]:
    root = tmp_path_factory.mktemp("tls")
    certs = make_certs(root / "certs", TENANT)
    other = make_certs(root / "other", "mallory")
    base = CoordinatorConfig(
        tenants=(Tenant(TENANT, hash_token(TOKEN)),),
        model=tiny_model_dir,
        dtype="float32",
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        grace_seconds=1.0,
    )
    lm, tokenizer = load_model(base)
    server_tls = TlsConfig(certs / "server.crt", certs / "server.key")
    configs = [
        base,
        base.with_(tls=server_tls, health_port=0),
        base.with_(tls=TlsConfig(server_tls.cert, server_tls.key, certs / "ca.crt")),
    ]
    running = [CoordinatorServer(c, lm, tokenizer) for c in configs]
    for s in running:
        s.start()
    plain, tls, mtls = (f"127.0.0.1:{s.port}" for s in running)
    assert running[1].health_port
    yield Servers(certs, other, plain, tls, mtls, running[1].health_port)
    for s in running:
        s.stop(grace=0.5)


def pairs(path: Path) -> Path:
    words = ["in", "the", "beginning", "god", "created", "the", "heaven", "and", "the", "earth"]
    path.write_text(
        "source\ttarget\n"
        + "".join(
            f"{' '.join(words[i : i + 3])}\t{' '.join(words[i + 1 : i + 4])}\n" for i in range(6)
        )
    )
    return path


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_tenant_trains_and_generates_over_tls(
    servers: Servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mutual: bool
) -> None:
    monkeypatch.setenv("PEMA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PEMA_TOKEN", TOKEN)
    tsv, out = pairs(tmp_path / "pairs.tsv"), tmp_path / "adapter"
    tls = ["--tls-ca", str(servers.certs / "ca.crt")]
    if mutual:
        tls += ["--tls-cert", str(servers.certs / "acme.crt")]
        tls += ["--tls-key", str(servers.certs / "acme.key")]
    remote = ["--coordinator", servers.mtls if mutual else servers.tls, *tls]
    train = ["train", "--train", str(tsv), "--valid", str(tsv), "--out", str(out)]
    assert (
        tenant_main([*train, "--rank", "4", "--epochs", "1", "--no-cache", "--quiet", *remote]) == 0
    )
    assert (out / "adapter_model.safetensors").is_file()
    assert tenant_main(["generate", "--adapter", str(out), *remote, "the earth"]) == 0


def test_health_port_is_plaintext_and_serves_only_health(servers: Servers) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{servers.tls_health_port}") as channel:
        r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
        # The Coordinator API is not there: tokens never travel in plaintext.
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.CoordinatorStub(channel).GetModelInfo(
                pb.GetModelInfoRequest(),
                metadata=(("authorization", f"Bearer {TOKEN}"),),
                timeout=5,
            )
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def misconfigurations(s: Servers) -> dict[str, tuple[str, TlsOptions | None, str]]:
    """name: (address, client TLS, what the one-line error must say)."""
    ca = s.certs / "ca.crt"
    return {
        "plaintext client, TLS server": (s.tls, None, "the server requires TLS"),
        "TLS client, plaintext server": (s.plain, TlsOptions(ca), "the server does not use TLS"),
        "wrong CA": (s.tls, TlsOptions(s.other / "ca.crt"), "certificate not trusted"),
        "mTLS without a client cert": (s.mtls, TlsOptions(ca), "requires a client certificate"),
        "mTLS, cert of another CA": (
            s.mtls,
            TlsOptions(ca, s.other / "mallory.crt", s.other / "mallory.key"),
            "requires a client certificate",
        ),
    }


def test_misconfiguration_is_named_and_not_retried(servers: Servers) -> None:
    for name, (address, tls, expected) in misconfigurations(servers).items():
        # A retried error would take at least the first backoff (60 s) to come back; the bound
        # leaves room for a loaded machine.
        client = CoordinatorClient(
            ClientConfig(address, TOKEN, tls, retry_seconds=300.0, backoff=60.0, max_backoff=60.0)
        )
        started = time.monotonic()
        with pytest.raises(CoordinatorTlsError) as info:
            client.model_info()
        client.close()
        assert time.monotonic() - started < 30, name
        assert expected in str(info.value), (name, str(info.value))


def test_cli_misconfiguration_is_one_line_exit_2(servers: Servers, tmp_path: Path) -> None:
    """Each case as a user meets it: `pema-tenant generate`, one stderr line, exit 2, and none
    of gRPC's C-core log lines. The two cases the issue names run side by side (each process
    imports torch); the in-process test above covers the other three."""
    wanted = ("plaintext client, TLS server", "wrong CA")
    cases = {k: v for k, v in misconfigurations(servers).items() if k in wanted}
    procs = {}
    for name, (address, tls, _) in cases.items():
        flags = []
        if tls is not None:
            flags += ["--tls-ca", str(tls.ca)]
            if tls.cert and tls.key:
                flags += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
        args = ["generate", "--adapter", str(tmp_path), "--coordinator", address, *flags, "x"]
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "tenant.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PEMA_TOKEN": TOKEN, "PEMA_CACHE_DIR": str(tmp_path / "cache")},
        )
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=900)  # each imports torch: slow on a loaded machine
        assert proc.returncode == 2, (name, out, err)
        assert err.count("\n") == 1 and err.startswith("pema-tenant: error: coordinator "), (
            name,
            err,
        )
        assert cases[name][2] in err, (name, err)


@pytest.mark.parametrize("flag", ["--tls-ca", "--tls-cert"])
def test_missing_tls_file_is_one_line(
    servers: Servers, tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    missing = tmp_path / "nope.pem"
    flags = [flag, str(missing)]
    if flag == "--tls-cert":
        flags += ["--tls-key", str(servers.certs / "acme.key")]
    args = ["generate", "--adapter", str(tmp_path), "--coordinator", servers.tls, "--token", "t"]
    assert tenant_main([*args, *flags, "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{missing} does not exist" in err, err
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("hello")
    assert tenant_main([*args, "--tls-ca", str(not_pem), "x"]) == 2
    assert "is not a PEM file" in capsys.readouterr().err


def test_coordinator_tls_flags_are_checked(
    servers: Servers, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tenants = tmp_path / "tenants.json"
    tenants.write_text(json.dumps({"tenants": [{"id": "a", "token_sha256": hash_token("t")}]}))
    serve = ["serve", "--tenants", str(tenants), "--port", "0", "--metrics-port", "-1"]
    cert, key = str(servers.certs / "server.crt"), str(servers.certs / "server.key")
    cases = {
        "--tls-key": [*serve, "--tls-cert", cert],
        "does not exist": [*serve, "--tls-cert", str(tmp_path / "x.crt"), "--tls-key", key],
        "needs --tls-cert": [*serve, "--tls-client-ca", str(servers.certs / "ca.crt")],
    }
    for expected, args in cases.items():
        assert coordinator_main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err


# -- Redis over TLS with the per-tenant ACL users -------------------------------------------------


@pytest.fixture(scope="module")
def tls_redis(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real redis-server speaking only TLS (as the prod overlay's), on a free port."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    root = tmp_path_factory.mktemp("redis-tls")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = servers.certs
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(c / "server.crt"), "--tls-key-file", str(c / "server.key"),
         "--tls-ca-cert-file", str(c / "ca.crt"), "--tls-auth-clients", "no",
         "--save", "", "--appendonly", "no", "--dir", str(root)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    admin = redis.Redis(port=port, ssl=True, ssl_ca_certs=str(c / "ca.crt"))
    for _ in range(100):
        try:
            admin.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.1)
    for tenant in ("acme", "globex"):
        admin.execute_command("ACL", "SETUSER", f"pema-{tenant}", *tenant_acl_rules(tenant, "pw"))
    yield port
    proc.terminate()
    proc.wait(10)


def test_redis_store_over_tls_with_acl_users(servers: Servers, tls_redis: int) -> None:
    ca = servers.certs / "ca.crt"
    url = f"rediss://pema-acme:pw@localhost:{tls_redis}/0"
    store = RedisMemoryStore.connect(url, tls_ca=ca)
    store._write("acme", "addr", [("blob", b"x")])
    assert store._read("acme", "addr", ["blob"]) == [b"x"]
    with pytest.raises(CacheError, match="NOPERM"):
        store._read("globex", "addr", ["blob"])
    # Plaintext to the TLS port, and a server certificate of another CA, are refused.
    with pytest.raises(CacheError, match="unavailable"):
        RedisMemoryStore.connect(f"redis://pema-acme:pw@localhost:{tls_redis}/0")
    with pytest.raises(CacheError, match="CERTIFICATE_VERIFY_FAILED"):
        RedisMemoryStore.connect(url, tls_ca=servers.other / "ca.crt")
    with pytest.raises(PemaError, match="does not exist"):
        RedisMemoryStore.connect(url, tls_ca=servers.other / "missing.crt")
