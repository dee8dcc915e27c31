"""A real `pema-tenant worker` process with a tiny model: the same steps give the same adapter
as in the ClientApp's own process, and keep the model and memories warm between rounds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file
from tiny_model import KJV

from pema.adapter import WEIGHTS_FILE
from pema.data import read_pairs
from tenant.demo import Processes, start_worker, write_pairs
from tenant.steps import run_job
from tenant.worker_link import Job, StepResult, WorkerLink, WorkerUnavailable, ask_worker

# Averaged in the clear: the steps return the adapter arrays, which the test compares (under
# SecAgg+, the default, they leave only masked, through the ClientApp's upload).
RUN = {
    "aggregation": "fedavg",
    "secure-aggregation": False,
    "eval-sample-size": 2,
    "local-epochs": 1,
}


@pytest.fixture
def procs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Processes]:
    monkeypatch.setenv("PEMA_DTYPE", "float32")  # here and in the worker: the same numerics
    procs = Processes(tmp_path / "logs")
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture
def worker(procs: Processes, tmp_path: Path) -> Path:
    return start_worker(procs, "t", tmp_path / "worker" / "t.sock")


def node(tmp_path: Path, name: str, model: Path) -> dict[str, Any]:
    return {
        "tenant-id": "acme",
        "model": str(model),
        "train": str(write_pairs(tmp_path / "train.tsv", read_pairs(KJV / "train.tsv", 16))),
        "valid": str(KJV / "valid.tsv"),
        "max-valid-pairs": 8,
        "adapter-dir": str(tmp_path / name / "adapter"),
        "cache-dir": str(tmp_path / name / "cache"),  # each path builds its own memories
        "aggregation-group": "g",
    }


def weights(result: StepResult) -> dict[str, np.ndarray]:
    assert result.arrays is not None
    return result.arrays


def test_the_worker_trains_the_same_adapter_and_keeps_its_state_warm(
    worker: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    here, there = node(tmp_path, "here", tiny_model_dir), node(tmp_path, "there", tiny_model_dir)
    link = WorkerLink(socket=worker)
    average: dict[str, np.ndarray] | None = None
    for rnd in (1, 2):
        local = run_job(Job("train", here, RUN, rnd, average))
        remote = ask_worker(link, Job("train", there, RUN, rnd, average))
        a, b = weights(local), weights(remote)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), rnd
        for path in (here, there):
            saved = load_file(str(Path(path["adapter-dir"]) / WEIGHTS_FILE))
            assert all(np.array_equal(saved[k], a[k]) for k in a)
        same = {k for k in local.metrics if "seconds" not in k and "memory" not in k}
        same -= {"state-loads"}
        assert {k: local.metrics[k] for k in same} == {k: remote.metrics[k] for k in same}
        assert local.info == remote.info
        # In its own process a step loads the model and both memories; the worker only once.
        assert local.metrics["state-loads"] == 3
        assert remote.metrics["state-loads"] == (3 if rnd == 1 else 0)
        average = {k: (a[k] + 1.0).astype(a[k].dtype) for k in a}  # a "group average"
        local_eval = run_job(Job("evaluate", here, RUN, rnd, average))
        remote_eval = ask_worker(link, Job("evaluate", there, RUN, rnd, average))
        assert local_eval.metrics["valid-loss"] == remote_eval.metrics["valid-loss"]
        assert local_eval.metrics["bleu"] == remote_eval.metrics["bleu"]
        assert (local_eval.metrics["state-loads"], remote_eval.metrics["state-loads"]) == (2, 0)


def test_a_worker_restart_loses_only_its_warm_state(
    procs: Processes, worker: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    there = node(tmp_path, "there", tiny_model_dir)
    link = WorkerLink(socket=worker, connect_seconds=0)
    first = ask_worker(link, Job("train", there, RUN, 1))
    procs.crash(procs.procs[-1])  # SIGKILL: no cleanup, its socket stays behind
    started = time.monotonic()
    with pytest.raises(WorkerUnavailable):
        ask_worker(link, Job("train", there, RUN, 2))
    assert time.monotonic() - started < 5
    start_worker(procs, "t2", worker)
    second = ask_worker(link, Job("train", there, RUN, 2))
    # It resumed from its checkpoint on disk with the memories from the disk cache.
    assert first.info["started-from"] == "init" and second.info["started-from"] == "checkpoint"
    assert (first.metrics["cache-hit"], second.metrics["cache-hit"]) == (0, 1)
    assert second.metrics["state-loads"] == 3
