"""`pema-tenant worker`: the tenant's long-lived process that runs its ClientApp's steps warm.

It keeps torch imported, the backend (the coordinator's connection with the model's head and
tokenizer, or a local model) and the memories it used last between rounds, and runs the same
train and evaluate steps (tenant.steps.run_job) that a ClientApp runs in its own process without
it. Everything a step keeps on disk (adapter checkpoints, cached memories, round figures, sample
log) is written as before, so a restart loses nothing but what was warm.

One step at a time: a step that arrives while another runs is answered at once with WorkerBusy
(that tenant's round gets an error row) rather than queued behind a step whose ClientApp may be
gone. tenant/worker_link.py describes the socket, its key and the messages.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from pema.errors import PemaError
from tenant.federation import error_reason
from tenant.worker_link import (
    HANDSHAKE_SECONDS,
    Arrays,
    Job,
    StepResult,
    WorkerBusy,
    job_from,
    key_path,
    receive,
    secure,
    send,
)

if TYPE_CHECKING:
    from tenant.steps import Warm

log = logging.getLogger("tenant.worker")
SOCKET_PATH_MAX = 108  # sun_path on Linux, the terminating NUL included


def check_private_folder(folder: Path) -> None:
    """Whoever can enter the socket's folder can reach the worker (and would read the key file,
    were its mode ever wrong): it must be this user's alone."""
    st = folder.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PemaError(
            f"{folder}: the worker's folder must be private (owned by this user, mode 0700); "
            f"it is mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}"
        )


def claim_socket(sock: Path) -> None:
    """Make `sock`'s folder (mode 0700) or check that the existing one is private, and remove
    what a worker that died left there; PemaError if a live worker serves `sock`."""
    if len(os.fsencode(sock)) >= SOCKET_PATH_MAX - len(".new"):
        limit = SOCKET_PATH_MAX - len(".new")
        raise PemaError(f"{sock}: a socket path must be shorter than {limit} bytes")
    try:
        sock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_private_folder(sock.parent)
        if os.path.lexists(sock):
            if not stat.S_ISSOCK(sock.lstat().st_mode):
                raise PemaError(f"{sock}: exists and is not a socket")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(sock))
                except ConnectionRefusedError:
                    sock.unlink()  # left by a worker that died
                else:
                    raise PemaError(f"{sock}: another worker is serving it")
        key_path(sock).unlink(missing_ok=True)
    except OSError as e:
        raise PemaError(f"{sock}: {e.strerror or e}") from None


def write_key(sock: Path) -> bytes:
    """A fresh random key in `<socket>.key`, mode 0600 from the start, replaced atomically."""
    key = os.urandom(32)
    tmp = sock.with_name(sock.name + ".key.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    os.replace(tmp, key_path(sock))
    return key


class Worker:
    """Serves steps on an authenticated Unix socket, one at a time, with the state it keeps."""

    def __init__(self, sock: Path, warm: Warm, run: Callable[[Job, Warm], StepResult]) -> None:
        self.sock = sock
        self.warm = warm
        self.run = run
        self.busy = threading.Lock()
        self.key = b""

    def serve_forever(self) -> None:
        self.key = write_key(self.sock)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bound under another name and renamed once listening: the socket's path appears only
        # when connections are accepted (what the ClientApp, the demo and probes wait for).
        bound = self.sock.with_name(self.sock.name + ".new")
        bound.unlink(missing_ok=True)
        umask = os.umask(0o177)  # the socket is 0600 from the moment it exists
        try:
            listener.bind(str(bound))
        finally:
            os.umask(umask)
        try:
            listener.listen(8)
            os.replace(bound, self.sock)
            log.info("worker ready on %s", self.sock)
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=self.serve_one, args=(conn,), daemon=True).start()
        finally:
            listener.close()
            self.sock.unlink(missing_ok=True)
            key_path(self.sock).unlink(missing_ok=True)

    def serve_one(self, sock: socket.socket) -> None:
        """One connection: authenticate it, read its job, answer it."""
        try:
            with sock:  # closed here unless `secure` took it over
                conn = secure(sock, self.key, server=True)
        except (EOFError, BrokenPipeError, ConnectionResetError):
            log.debug("a connection closed before authenticating (a readiness check)")
            return
        except (OSError, AuthenticationError) as e:
            log.warning("refused a connection: %r", e)
            return
        try:
            with conn:
                self._answer(conn)
        except (OSError, EOFError) as e:
            log.warning("the ClientApp went away before its answer: %r", e)

    def _answer(self, conn: Connection) -> None:
        try:
            job = job_from(*receive(conn, HANDSHAKE_SECONDS))
        except PemaError as e:  # another protocol version, or a malformed job
            log.warning("refused a job: %s", e)
            send(conn, {"error": error_reason("train", e)})
            return
        if not self.busy.acquire(blocking=False):
            log.warning("refused a %s step: another step is running", job.phase)
            send(conn, {"error": error_reason(job.phase, WorkerBusy())})
            return
        started, loads = time.perf_counter(), self.warm.loads
        answer: dict[str, Any]
        arrays: Arrays | None = None
        try:
            result = self.run(job, self.warm)
        except Exception as e:
            # The whole error stays in this log; the ClientApp gets the phase and class only.
            log.exception("round %d: %s step failed", job.server_round, job.phase)
            answer = {"error": error_reason(job.phase, e)}
        else:
            log.info(
                "round %d: %s step in %.2f s, %d loads", job.server_round, job.phase,
                time.perf_counter() - started, self.warm.loads - loads,
            )  # fmt: skip
            answer, arrays = {"metrics": result.metrics, "info": result.info}, result.arrays
        finally:
            self.busy.release()  # the step is over: the next may start while this one answers
        send(conn, answer, arrays)


def _stop(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)  # SIGTERM: leave through serve_forever's cleanup (socket and key removed)


def serve(sock: Path, memory_slots: int) -> int:
    """Load the step code (torch: seconds) and serve on `sock` until SIGTERM or Ctrl-C; the
    socket appears once the worker is ready. `claim_socket(sock)` first."""
    from tenant.steps import Warm, run_job

    log.setLevel(logging.INFO)  # one line per step: what it cost, what it loaded
    signal.signal(signal.SIGTERM, _stop)
    Worker(sock, Warm(memory_slots), run_job).serve_forever()
    return 0
