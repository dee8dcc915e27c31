"""Operating a real coordinator (`pema-coordinator serve` as a process, tiny model): a busy port
is refused, SIGHUP reloads the tenants file without dropping live sessions, tokens rotate."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from tiny_model import KJV

from coordinator.config import ConfigError, CoordinatorConfig, Tenant, hash_token
from coordinator.server import CoordinatorServer, load_model
from pema.data import read_pairs
from pema.memory import Memory, build_memory, memory_spec
from pema.prompts import PromptFormat
from pema.settings import MemoryMode
from tenant.backend import local_backend
from tenant.coordinator_client import (
    ClientConfig,
    CoordinatorBackbone,
    CoordinatorClient,
    CoordinatorError,
)
from tenant.memory_store import DiskMemoryStore

OLD, NEW, BETA = "old-token-of-alpha", "new-token-of-alpha", "token-of-beta"


def write_tenants(path: Path, tenants: dict[str, list[str]], **extra: object) -> Path:
    entries = [
        {"id": t, "token_sha256": [hash_token(k) for k in keys]} for t, keys in tenants.items()
    ]
    path.write_text(json.dumps({"tenants": entries, **extra}))
    return path


class Served:
    """`pema-coordinator serve` in a subprocess; `lines()` reads what it prints on stdout."""

    def __init__(self, model: Path, tenants: Path, port: int = 0) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "coordinator.cli", "serve", "--model", str(model),
                "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
                "--metrics-port", "-1", "--tenants", str(tenants), "--grace-seconds", "5",
                "--log-level", "WARNING",
            ],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
        )  # fmt: skip
        self.clients: list[CoordinatorClient] = []

    def wait_line(self, expected: str) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if expected not in line:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=30)
            raise AssertionError(f"expected {expected!r}, got {line!r}; stderr: {err}")
        return line

    def client(self, address: str, token: str) -> CoordinatorClient:
        c = CoordinatorClient(ClientConfig(address, token, decode_dtype="float32", retry_seconds=0))
        self.clients.append(c)
        return c

    def close(self) -> None:
        for c in self.clients:
            c.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def served(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Served, str, Path]]:
    """One server for the module: the busy-port test leaves it as it was, the SIGHUP test last."""
    tenants = write_tenants(tmp_path_factory.mktemp("ops") / "tenants.json", {"alpha": [OLD]})
    s = Served(tiny_model_dir, tenants)
    try:
        line = s.wait_line("listening on port")
        port = int(line.split("port ")[1].split(",")[0])
        yield s, f"127.0.0.1:{port}", tenants
    finally:
        s.close()


def test_second_coordinator_on_a_busy_port_is_refused(
    served: tuple[Served, str, Path], tiny_model_dir: Path
) -> None:
    first, address, tenants = served
    second = Served(tiny_model_dir, tenants, port=int(address.rsplit(":", 1)[1]))
    try:
        _, err = second.proc.communicate(timeout=120)
    finally:
        second.close()
    assert second.proc.returncode == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "port is in use" in lines[0], err
    # The first one still serves, alone.
    assert first.client(address, OLD).model_info().hidden_size == 32
    # Past the early check, gRPC's own bind refuses too (SO_REUSEPORT off) instead of sharing.
    config = CoordinatorConfig(
        tenants=(Tenant("alpha", hash_token(OLD)),),
        model=tiny_model_dir,
        dtype="float32",
        host="127.0.0.1",
        port=int(address.rsplit(":", 1)[1]),
        metrics_port=None,
    )
    server = CoordinatorServer(config, *load_model(config))
    with pytest.raises(ConfigError, match="port is in use"):
        server.start()


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(CoordinatorError) as e:
        call()  # type: ignore[operator]
    return e.value.code


def test_sighup_reloads_tenants_and_rotates_tokens_without_dropping_sessions(
    served: tuple[Served, str, Path], tmp_path: Path
) -> None:
    s, address, tenants = served
    old = s.client(address, OLD)
    session = CoordinatorBackbone(old, tmp_path / "cache").session()
    h0 = session.start([[1, 2, 3]])
    assert _code(s.client(address, NEW).model_info) == grpc.StatusCode.UNAUTHENTICATED

    # Rotation, step 1: alpha holds both digests; a tenant is added.
    write_tenants(tenants, {"alpha": [OLD, NEW], "beta": [BETA]})
    s.proc.send_signal(signal.SIGHUP)
    s.wait_line("tenants reloaded")
    assert s.client(address, NEW).model_info().hidden_size == 32
    assert s.client(address, BETA).model_info().hidden_size == 32
    assert s.client(address, OLD).model_info().hidden_size == 32

    # Step 2: the old digest and beta are gone; the session opened with the old token lives on.
    write_tenants(tenants, {"alpha": [NEW]})
    s.proc.send_signal(signal.SIGHUP)
    s.wait_line("tenants reloaded")
    assert _code(s.client(address, OLD).model_info) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(s.client(address, BETA).model_info) == grpc.StatusCode.UNAUTHENTICATED
    assert s.client(address, NEW).model_info().hidden_size == 32
    assert session.step([4]).shape == h0.shape == (1, 32)
    session.close()

    # A bad file (a typo'd key) is refused with a log line; the running tenants stay.
    write_tenants(tenants, {"alpha": [OLD]}, tenant_defaults={})
    s.proc.send_signal(signal.SIGHUP)
    s.wait_line("tenants reloaded")
    assert s.client(address, NEW).model_info().hidden_size == 32
    assert _code(s.client(address, OLD).model_info) == grpc.StatusCode.UNAUTHENTICATED
    s.close()
    assert s.proc.stderr is not None
    assert "unknown key tenant_defaults" in s.proc.stderr.read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_memory_build_survives_a_coordinator_restart(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Kill -9 the coordinator in the middle of an Encode stream, start a new one on the same
    port: the tenant's build waits (retry budget), resumes with the items not yet returned, and
    completes with the same memory as a build in this process."""
    port = _free_port()
    tenants = write_tenants(tmp_path / "tenants.json", {"alpha": [OLD]})
    first = Served(tiny_model_dir, tenants, port)
    second: Served | None = None
    try:
        first.wait_line("listening on port")
        client = CoordinatorClient(
            ClientConfig(
                f"127.0.0.1:{port}", OLD, decode_dtype="float32", retry_seconds=600,
                max_request_items=4,
            )
        )  # fmt: skip
        first.clients.append(client)
        remote = CoordinatorBackbone(client, tmp_path / "cache")
        fmt = PromptFormat(remote.tokenizer())
        pairs = read_pairs(KJV / "train.tsv", 24)
        items = fmt.items(pairs)
        spec = memory_spec(remote.info, pairs, fmt.template, MemoryMode.TEACHER_FORCED)
        store = DiskMemoryStore(tmp_path / "memories", shard_pairs=8)
        seen = [0]
        reached, killed = threading.Event(), threading.Event()

        def progress(n: int) -> None:
            seen[0] += n
            if seen[0] == 10:  # inside the third request of 4 items, in the second shard
                reached.set()
                killed.wait(60)  # the stream stays open while the server dies

        built: list[Memory] = []

        def build() -> None:
            built.append(
                store.build(
                    "alpha", spec, len(items),
                    lambda lo, hi: build_memory(remote, items[lo:hi], spec, progress),
                )
            )  # fmt: skip

        worker = threading.Thread(target=build)
        worker.start()
        assert reached.wait(60)
        first.proc.kill()
        first.proc.wait()
        killed.set()
        second = Served(tiny_model_dir, tenants, port)
        second.wait_line("listening on port")
        worker.join(600)  # seconds on a quiet machine; minutes when the cores are shared
        assert not worker.is_alive() and len(built) == 1
    finally:
        first.close()
        if second is not None:
            second.close()
    local = local_backend(tiny_model_dir, torch.float32).backbone
    expected = build_memory(local, items, spec)
    memory = built[0]
    assert memory.n_pairs == 24 and torch.equal(memory.targets, expected.targets)
    torch.testing.assert_close(memory.keys.float(), expected.keys.float(), atol=2e-3, rtol=1e-2)
    assert store.get("alpha", spec) is not None
