"""Where a ClientApp step runs: in the ClientApp's own process, or in the tenant's worker.

Flower 1.41 starts a fresh ClientApp process for every message, so a step that runs there imports
torch and loads the model's head, the tokenizer and the memories again every round (seconds each:
benchmarks/results/rounds.md). When the node config names `worker-socket`, the ClientApp forwards
the step to the tenant's long-lived worker (`pema-tenant worker`, tenant/worker.py), which keeps
that state warm, and builds its reply from the worker's answer; without it the step runs in the
ClientApp's process as before. Either way `tenant.steps.run_job` does the work.

The link is a Unix domain socket in a private folder (0700, the socket 0600). The standard
library's multiprocessing.connection frames the messages and authenticates both ends: the worker
writes a fresh random key next to its socket (0600) when it starts, and each side proves that it
holds the key (an HMAC challenge) before anything else is read. Messages are a JSON header plus
arrays in NumPy's .npy format, loaded with allow_pickle=False: nothing received is unpickled, and
a ClientApp (from the run's FAB) and a worker (from the installed package) of different versions
fail with ProtocolMismatch rather than misread each other. Every wait has a deadline: a worker
that is down, dies or hangs fails the step with a short reason instead of stalling the round.
This is the standard library and a few lines; a gRPC service would add generated stubs and a
server for one local caller, and its deadlines are no simpler.

This module imports no torch: in worker mode the ClientApp process never loads it.
"""

from __future__ import annotations

import io
import json
import re
import socket
import struct
import time
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import (
    Connection,
    answer_challenge,
    deliver_challenge,
)
from pathlib import Path
from typing import Any, Literal

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from pydantic import BaseModel, ConfigDict, Field

from pema.errors import PemaError
from tenant.federation import ARRAYS, CONFIG, error_reason, validated

PROTOCOL = 1  # the message format below; a worker answers another version with an error
Phase = Literal["train", "evaluate"]
Arrays = dict[str, np.ndarray]
# What a failed step may say: its phase and an exception's class name (never a message).
REASON = re.compile(r"(?:train|evaluate)-failed:[A-Za-z_][A-Za-z0-9_]{0,99}")


class WorkerUnavailable(PemaError):
    """No worker answers on the socket, or the connection broke: the step did not run, or its
    answer is lost."""


class WorkerTimeout(PemaError):
    """The worker did not answer in time."""


class WorkerBusy(PemaError):
    """The worker is running another step (it runs one at a time)."""


class ProtocolMismatch(PemaError):
    """The ClientApp and the worker run versions whose messages differ: upgrade them together."""


class StepFailed(PemaError):
    """The step failed in the worker; `reason` is what the reply may say (phase and class)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the worker's step failed: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class Job:
    """One step as the ClientApp received it: the node and run configs as Flower gives them, the
    round, and the arrays the server sent (None when it sent none)."""

    phase: Phase
    node: dict[str, Any]
    run: dict[str, Any]
    server_round: int
    arrays: Arrays | None = None


@dataclass(frozen=True)
class StepResult:
    """What the reply is built from, through the allow-list (tenant/federation.py)."""

    metrics: dict[str, int | float]
    info: dict[str, str]
    arrays: Arrays | None = None


class WorkerLink(BaseModel):
    """The node config keys that send steps to a worker; the worker never sees them."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    socket: Path = Field(alias="worker-socket")
    # Longest a step may take in the worker: past it the round gets an error, not a hang.
    timeout: float = Field(1800.0, alias="worker-timeout", gt=0)
    # How long to keep trying to reach a worker that is not listening yet (starting, restarting).
    connect_seconds: float = Field(60.0, alias="worker-connect-seconds", ge=0)


WORKER_KEYS = tuple(f.alias or name for name, f in WorkerLink.model_fields.items())
HANDSHAKE_SECONDS = 10.0  # the key exchange and every read of a message already under way


def key_path(sock: Path) -> Path:
    """The worker's key file, next to its socket."""
    return sock.with_name(sock.name + ".key")


def _set_timeouts(sock: socket.socket, seconds: float) -> None:
    # Kernel-level timeouts, so that they also bound the reads and writes inside the standard
    # library's handshake (a stopped peer would otherwise block them forever).
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def secure(sock: socket.socket, key: bytes, *, server: bool) -> Connection:
    """A connected socket as an authenticated Connection: each side proves that it holds the key.
    Raises AuthenticationError on a wrong key, OSError when the peer stops answering (a read or
    write blocked for HANDSHAKE_SECONDS: BlockingIOError) or goes away."""
    _set_timeouts(sock, HANDSHAKE_SECONDS)
    conn = Connection(sock.detach())
    try:
        if server:
            deliver_challenge(conn, key)
            answer_challenge(conn, key)
        else:
            answer_challenge(conn, key)
            deliver_challenge(conn, key)
    except BaseException:
        conn.close()
        raise
    return conn


def send(conn: Connection, header: dict[str, Any], arrays: Arrays | None = None) -> None:
    """One message: the JSON header (with the arrays' names), then each array as .npy bytes."""
    names = list(arrays) if arrays is not None else None
    conn.send_bytes(json.dumps({**header, "protocol": PROTOCOL, "arrays": names}).encode())
    for name in names or []:
        buf = io.BytesIO()
        np.save(buf, (arrays or {})[name], allow_pickle=False)
        conn.send_bytes(buf.getvalue())


def receive(conn: Connection, timeout: float) -> tuple[dict[str, Any], Arrays | None]:
    """One message sent by `send`; WorkerTimeout if none starts within `timeout` seconds,
    ProtocolMismatch if the peer speaks another version."""
    if not conn.poll(timeout):
        raise WorkerTimeout(f"no answer within {timeout:g} s")
    header = json.loads(conn.recv_bytes())
    if not isinstance(header, dict) or header.get("protocol") != PROTOCOL:
        raise ProtocolMismatch(f"the peer does not speak protocol {PROTOCOL}")
    names = header.pop("arrays", None)
    if names is None:
        return header, None
    arrays = {str(n): np.load(io.BytesIO(conn.recv_bytes()), allow_pickle=False) for n in names}
    return header, arrays


def job_header(job: Job) -> dict[str, Any]:
    return {"phase": job.phase, "node": job.node, "run": job.run, "server-round": job.server_round}


def job_from(header: dict[str, Any], arrays: Arrays | None) -> Job:
    """The Job of a `job_header` message; PemaError if it is malformed."""
    phase, node, run = header.get("phase"), header.get("node"), header.get("run")
    server_round = header.get("server-round")
    if phase not in ("train", "evaluate"):
        raise PemaError("a job without a known phase")
    if not (isinstance(node, dict) and isinstance(run, dict) and isinstance(server_round, int)):
        raise PemaError("a malformed job")
    return Job(phase, node, run, server_round, arrays)


def connect(sock: Path, connect_seconds: float) -> Connection:
    """An authenticated connection to the worker on `sock`, retried for `connect_seconds` while
    no worker is ready there (starting or restarting: its key file and socket appear then)."""
    deadline = time.monotonic() + connect_seconds
    while True:
        try:
            key = key_path(sock).read_bytes()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(HANDSHAKE_SECONDS)
                s.connect(str(sock))
                s.settimeout(None)  # blocking again: the handshake sets kernel-level timeouts
                return secure(s, key, server=False)
        except (OSError, AuthenticationError) as e:
            # A restarted worker has a new key: the old one fails authentication, a retry works.
            if time.monotonic() >= deadline:
                raise WorkerUnavailable(f"no worker answers on {sock}: {e!r}") from None
            time.sleep(0.5)


def ask_worker(link: WorkerLink, job: Job) -> StepResult:
    """Run the step in the tenant's worker; raises StepFailed with the worker's short reason,
    or WorkerUnavailable, WorkerTimeout, WorkerBusy, ProtocolMismatch."""
    conn = connect(link.socket, link.connect_seconds)
    try:
        send(conn, job_header(job), job.arrays)
        reply, arrays = receive(conn, link.timeout)
    except BlockingIOError:  # a kernel-level timeout in the middle of a message
        raise WorkerTimeout(f"the worker on {link.socket} stopped answering") from None
    except (OSError, EOFError) as e:
        raise WorkerUnavailable(f"lost the worker on {link.socket}: {e!r}") from None
    finally:
        conn.close()
    if "error" in reply:
        reason = str(reply["error"])
        if reason == error_reason(job.phase, WorkerBusy()):
            raise WorkerBusy(f"the worker on {link.socket} is running another step")
        # Anything but a phase and a class name is replaced: a reply must not carry text.
        raise StepFailed(reason if REASON.fullmatch(reason) else f"{job.phase}-failed:StepFailed")
    return StepResult(reply["metrics"], reply["info"], arrays)


def received_arrays(msg: Message) -> Arrays | None:
    """The arrays the server sent (the group's average) as NumPy arrays; None when it sent none."""
    record = msg.content.array_records.get(ARRAYS)
    return {k: v.numpy() for k, v in record.items()} if record is not None and len(record) else None


def array_record(arrays: Arrays | None) -> ArrayRecord | None:
    """The reply's ArrayRecord: the same bytes as one made from the adapter's torch state_dict."""
    return None if arrays is None else ArrayRecord({k: Array(v) for k, v in arrays.items()})


def run_step(phase: Phase, msg: Message, context: Context) -> StepResult:
    """The ClientApp's step: in the tenant's worker when the node config names one, else here."""
    node = dict(context.node_config)
    link = None
    if node.get("worker-socket"):
        keys = {k: node.pop(k) for k in WORKER_KEYS if k in node}
        link = validated(WorkerLink, keys, "node config")
    sent: dict[str, Any] = dict(msg.content[CONFIG])
    server_round = int(sent.get("server-round", 1))
    job = Job(phase, node, dict(context.run_config), server_round, received_arrays(msg))
    if link is not None:
        return ask_worker(link, job)
    # Imported here: torch and the model code load only where the step runs in this process.
    from tenant.steps import run_job

    return run_job(job)
