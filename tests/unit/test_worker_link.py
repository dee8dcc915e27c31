"""The link between a ClientApp and the tenant's worker, with a worker whose step is a stand-in:
authentication, one step at a time, errors as phase and class only, deadlines instead of hangs,
the private socket folder, and a ClientApp import without torch."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from pema.errors import DataError, PemaError
from tenant.worker import Worker, claim_socket
from tenant.worker_link import (
    Job,
    StepFailed,
    StepResult,
    WorkerBusy,
    WorkerLink,
    WorkerTimeout,
    WorkerUnavailable,
    array_record,
    ask_worker,
    key_path,
)

REPO = Path(__file__).resolve().parents[2]
RELEASE = threading.Event()


@dataclass
class FakeWarm:
    loads: int = 0


def fake_step(job: Job, warm: FakeWarm) -> StepResult:
    """What the node config's `do` says: answer, fail with a private message, or block."""
    do = job.node["do"]
    if do == "fail":
        raise DataError("/private/tenant/train.tsv line 3: 'a secret sentence'")
    if do == "block":
        RELEASE.wait(30)
    arrays = {k: v * 2 for k, v in job.arrays.items()} if job.arrays else None
    return StepResult({"num-examples": 3, "round": job.server_round}, {"group": "g"}, arrays)


@pytest.fixture(scope="module")
def sock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("w") / "private" / "worker.sock"
    claim_socket(path)
    worker = Worker(path, FakeWarm(), fake_step)  # type: ignore[arg-type]
    threading.Thread(target=worker.serve_forever, daemon=True).start()
    deadline = time.monotonic() + 10
    while not path.is_socket() and time.monotonic() < deadline:
        time.sleep(0.05)
    yield path
    RELEASE.set()


def job(do: str, arrays: dict[str, np.ndarray] | None = None) -> Job:
    return Job("train", {"do": do}, {"num-server-rounds": 2}, 2, arrays)


def test_a_step_and_its_arrays_go_both_ways(sock: Path) -> None:
    sent = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    result = ask_worker(WorkerLink(socket=sock), job("ok", sent))
    assert result.metrics == {"num-examples": 3, "round": 2} and result.info == {"group": "g"}
    assert result.arrays is not None
    assert np.array_equal(result.arrays["a.weight"], sent["a.weight"] * 2)
    assert result.arrays["a.weight"].dtype == np.float32


def test_socket_folder_and_key_are_private(sock: Path) -> None:
    assert (sock.parent.stat().st_mode & 0o777) == 0o700
    assert (sock.stat().st_mode & 0o777) == 0o600
    assert (key_path(sock).stat().st_mode & 0o777) == 0o600


def test_a_failed_step_says_its_phase_and_class_only(sock: Path) -> None:
    with pytest.raises(StepFailed) as e:
        ask_worker(WorkerLink(socket=sock), job("fail"))
    assert e.value.reason == "train-failed:DataError"
    assert "secret" not in str(e.value) and "/private" not in str(e.value)


def test_one_step_at_a_time_and_a_slow_step_times_out(sock: Path) -> None:
    RELEASE.clear()
    link = WorkerLink(socket=sock, timeout=1.5)
    started = time.monotonic()
    with pytest.raises(WorkerTimeout):
        ask_worker(link, job("block"))  # still running in the worker after the ClientApp gave up
    assert time.monotonic() - started < 5
    with pytest.raises(WorkerBusy):
        ask_worker(link, job("ok"))
    RELEASE.set()
    deadline = time.monotonic() + 10
    while True:  # the worker serves again once the slow step ends
        try:
            assert ask_worker(link, job("ok")).metrics["round"] == 2
            break
        except WorkerBusy:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_a_wrong_key_is_refused(sock: Path, tmp_path: Path) -> None:
    # A folder of its own whose socket is the worker's (a hard link) but whose key is not.
    other = tmp_path / "other.sock"
    os.link(sock, other)
    key_path(other).write_bytes(b"not the key")
    with pytest.raises(WorkerUnavailable, match="AuthenticationError"):
        ask_worker(WorkerLink(socket=other, connect_seconds=0), job("ok"))


def test_a_readiness_check_that_connects_and_leaves_is_no_warning(
    sock: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.connect(str(sock))  # as the demo's start_worker does
    time.sleep(0.5)
    # (Other tests' steps may still answer meanwhile, and the wrong-key test's refusal may be
    # logged late: only the probe's own record counts.)
    refused = [
        r
        for r in caplog.records
        if "refused a connection" in r.getMessage() and "AuthenticationError" not in r.getMessage()
    ]
    assert not [r for r in refused if r.levelno >= logging.WARNING], caplog.text
    assert ask_worker(WorkerLink(socket=sock), job("ok")).metrics["round"] == 2


def test_no_worker_is_a_clear_error_within_the_connect_window(tmp_path: Path) -> None:
    link = WorkerLink.model_validate(
        {"worker-socket": str(tmp_path / "none.sock"), "worker-connect-seconds": 1}
    )
    started = time.monotonic()
    with pytest.raises(WorkerUnavailable, match="no worker answers"):
        ask_worker(link, job("ok"))
    assert 1 <= time.monotonic() - started < 4


def test_claiming_a_socket(sock: Path, tmp_path: Path) -> None:
    with pytest.raises(PemaError, match="another worker is serving"):
        claim_socket(sock)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(PemaError, match="must be private"):
        claim_socket(shared / "w.sock")
    # A socket left by a worker that died is replaced.
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    stale = private / "w.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))
    claim_socket(stale)
    assert not stale.exists()
    with pytest.raises(PemaError, match="shorter than"):
        claim_socket(private / ("x" * 120))


def test_the_reply_arrays_are_the_bytes_a_torch_state_dict_gives() -> None:
    state = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    from_numpy = array_record({k: v.numpy() for k, v in state.items()})
    assert from_numpy is not None
    from_torch = ArrayRecord(state)
    assert list(from_numpy) == list(from_torch)
    assert all(from_numpy[k].data == from_torch[k].data for k in state)


def test_bad_worker_arguments_are_one_line_exit_2(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    cli = Path(sys.executable).parent / "pema-tenant"
    for args, expected in [
        (["--socket", str(shared / "w.sock")], "must be private"),
        (["--socket", str(tmp_path / "p" / "w.sock"), "--memory-slots", "0"], "at least 1"),
        (["--socket", str(tmp_path / ("x" * 120))], "shorter than"),
        ([], "--socket"),
    ]:
        proc = subprocess.run(
            [str(cli), "worker", *args], capture_output=True, text=True, timeout=60
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("pema-tenant") and expected in lines[0], proc.stderr


IMPORT_CLIENTAPP = """
import json, sys, time
start = time.perf_counter()
import tenant.flower_client
seconds = time.perf_counter() - start
print(json.dumps([sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers"}),
                  seconds]))
"""


def test_the_clientapp_imports_no_torch() -> None:
    """Flower starts a ClientApp process for every message: in worker mode, importing it is all
    that process does before forwarding the step, so torch (seconds) must stay out."""
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_CLIENTAPP],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=True,
    )  # fmt: skip
    heavy, seconds = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"tenant.flower_client imports in {seconds:.2f} s")
    assert heavy == []
