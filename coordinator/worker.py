"""The model worker: one thread owns the frozen model and runs every forward pass.

Encode items from all tenants wait in per-tenant queues. Each forward pass is assembled by
visiting tenants round-robin, one item per visit, until the pass would exceed the token budget
(rows x longest row), so a tenant with a thousand queued items and a tenant with one share each
pass: the small one waits for at most one pass, never for the large one's whole request.

Decode steps are batched continuously: every live session with a step waiting is stepped in one
forward pass (`FrozenLM.step_sessions`); sessions join and leave between steps. Since the tenant
picks each next token, the sessions of the last pass send their next steps a few milliseconds
apart: the worker waits for them up to `decode_wait_seconds` (never when other work is queued),
so that they stay in one pass instead of splitting into a pass of one and a pass of the rest.

Each turn of the loop runs the calls waiting (session starts), then one decode pass, then one
encode pass: neither kind can starve the other.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

from coordinator.errors import Unavailable
from coordinator.metrics import Metrics
from pema.backbone import Encoded, EncodeItem, FrozenLM, LocalSession, MemoryMode

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_BATCH_ROWS = 64
MAX_DECODE_ROWS = 64  # sequences stepped in one decode pass
DECODE_WAIT_SECONDS = 0.02


@dataclass
class EncodeJob:
    tenant: str
    index: int
    item: EncodeItem
    mode: MemoryMode
    deliver: Callable[[int, Encoded | BaseException], None]
    cancelled: threading.Event
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def tokens(self) -> int:
        return len(self.item.prompt) + len(self.item.target)


@dataclass
class StepJob:
    session: LocalSession
    tokens: list[int]
    future: Future[Tensor]
    enqueued: float = field(default_factory=time.perf_counter)


class ModelWorker:
    def __init__(
        self,
        lm: FrozenLM,
        metrics: Metrics,
        max_batch_tokens: int,
        max_queued_tokens: int,
        threads: int | None = None,
        decode_wait_seconds: float = DECODE_WAIT_SECONDS,
    ) -> None:
        self.lm = lm
        self.decode_wait_seconds = decode_wait_seconds
        self.metrics = metrics
        self.max_batch_tokens = max_batch_tokens
        self.max_queued_tokens = max_queued_tokens
        self.threads = threads
        self._cv = threading.Condition()
        self._queues: dict[str, deque[EncodeJob]] = {}
        self._order: deque[str] = deque()  # round-robin order of tenants with queued items
        self._calls: deque[tuple[Callable[[], Any], Future[Any], float]] = deque()
        self._steps: deque[StepJob] = deque()
        # The sessions of the last decode pass: the next pass waits a moment for their steps.
        self._stepped: list[weakref.ref[LocalSession]] = []
        self._queued_tokens = 0
        self._stopping = False
        self._hold = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join()

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the worker from starting any model work (maintenance; tests of queueing)."""
        with self._hold:
            yield

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    def submit_encode(self, jobs: list[EncodeJob]) -> None:
        tokens = sum(j.tokens for j in jobs)
        with self._cv:
            if self._stopping:
                raise Unavailable("the coordinator is shutting down")
            if self._queued_tokens + tokens > self.max_queued_tokens:
                raise Unavailable(
                    f"overloaded: {self._queued_tokens} tokens queued, the server takes "
                    f"{self.max_queued_tokens}; retry later"
                )
            self._queued_tokens += tokens
            for job in jobs:
                q = self._queues.setdefault(job.tenant, deque())
                if not q:
                    self._order.append(job.tenant)
                q.append(job)
            self._cv.notify_all()

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run fn on the worker thread (it owns the model); returns its future result."""
        future: Future[T] = Future()
        with self._cv:
            if self._stopping:
                raise Unavailable("the coordinator is shutting down")
            self._calls.append((fn, future, time.perf_counter()))
            self._cv.notify_all()
        return future

    def step(self, session: LocalSession, tokens: list[int]) -> Future[Tensor]:
        """Queue one decode step of a started session; it joins the next decode pass."""
        future: Future[Tensor] = Future()
        with self._cv:
            if self._stopping:
                raise Unavailable("the coordinator is shutting down")
            self._steps.append(StepJob(session, tokens, future))
            self._cv.notify_all()
        return future

    def _wait_for_stragglers(self) -> None:
        """Give the last pass's sessions a moment to send their next steps (lock held)."""
        if not self._steps or self.decode_wait_seconds <= 0:
            return
        deadline = time.perf_counter() + self.decode_wait_seconds
        while not self._stopping and not self._calls and not self._order:
            waiting = {id(j.session) for j in self._steps}
            missing = [
                s
                for ref in self._stepped
                if (s := ref()) is not None and not s.closed and id(s) not in waiting
            ]
            left = deadline - time.perf_counter()
            if not missing or left <= 0:
                return
            self._cv.wait(left)

    def _take_steps(self) -> list[StepJob]:
        """The steps of the next decode pass, oldest first, one per session (lock held)."""
        taken: list[StepJob] = []
        later: deque[StepJob] = deque()
        seen: set[int] = set()
        rows = 0
        limit = MAX_DECODE_ROWS if self.lm.batchable_decode else 1
        while self._steps:
            job = self._steps.popleft()
            if id(job.session) in seen or (taken and rows + len(job.tokens) > limit):
                later.append(job)
                continue
            seen.add(id(job.session))
            taken.append(job)
            rows += len(job.tokens)
        self._steps = later
        return taken

    def _next_batch(self) -> list[EncodeJob]:
        """Round-robin over tenants, one item per visit, under the token budget (lock held)."""
        batch: list[EncodeJob] = []
        mode: MemoryMode | None = None
        longest = 0
        progress = True
        while progress and len(batch) < MAX_BATCH_ROWS:
            progress = False
            for _ in range(len(self._order)):
                tenant = self._order[0]
                self._order.rotate(-1)
                q = self._queues[tenant]
                while q and q[0].cancelled.is_set():
                    dropped = q.popleft()
                    self._queued_tokens -= dropped.tokens
                if not q:
                    continue
                job = q[0]
                if mode is not None and job.mode != mode:
                    continue
                width = max(longest, job.tokens)
                if batch and (len(batch) + 1) * width > self.max_batch_tokens:
                    continue
                q.popleft()
                batch.append(job)
                mode, longest, progress = job.mode, width, True
                if len(batch) >= MAX_BATCH_ROWS:
                    break
        # Tenants whose queues ran dry leave the rotation.
        self._order = deque(t for t in self._order if self._queues[t])
        for t in [t for t, q in self._queues.items() if not q]:
            del self._queues[t]
        return batch

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self._cv:
                while (
                    not self._stopping and not self._calls and not self._order and not self._steps
                ):
                    self._cv.wait()
                if self._stopping and not self._calls and not self._order and not self._steps:
                    return
                self._wait_for_stragglers()
                calls = list(self._calls)
                self._calls.clear()
                steps = self._take_steps()
            with self._hold:
                for fn, future, enqueued in calls:
                    self.metrics.queue_seconds.labels("decode").observe(
                        time.perf_counter() - enqueued
                    )
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn())
                        except BaseException as e:
                            future.set_exception(e)
                if steps:
                    self._decode(steps)
                with self._cv:
                    batch = self._next_batch()
                if batch:
                    self._encode(batch)

    def _decode(self, steps: list[StepJob]) -> None:
        now = time.perf_counter()
        ready: list[StepJob] = []
        for job in steps:
            self.metrics.queue_seconds.labels("decode").observe(now - job.enqueued)
            if not job.future.set_running_or_notify_cancel():
                continue
            try:  # a bad step fails alone, before it joins the pass
                job.session.check_step(job.tokens)
            except BaseException as e:
                job.future.set_exception(e)
                continue
            ready.append(job)
        if not ready:
            return
        rows = sum(len(j.tokens) for j in ready)
        self.metrics.decode_batch_rows.observe(rows)
        self.metrics.batch_occupancy.labels("decode").set(rows / MAX_DECODE_ROWS)
        try:
            results = self.lm.step_sessions([(j.session, j.tokens) for j in ready])
        except BaseException as e:  # delivered to every session in the pass, mapped there
            log.debug("decode pass failed: %s", e)
            for job in ready:
                job.future.set_exception(e)
            return
        for job, hidden in zip(ready, results, strict=True):
            job.future.set_result(hidden)
        with self._cv:
            self._stepped = [weakref.ref(j.session) for j in ready]

    def _encode(self, batch: list[EncodeJob]) -> None:
        now = time.perf_counter()
        for job in batch:
            self.metrics.queue_seconds.labels("encode").observe(now - job.enqueued)
        padded = len(batch) * max(j.tokens for j in batch)
        self.metrics.batch_tokens.observe(padded)
        self.metrics.batch_occupancy.labels("encode").set(min(1.0, padded / self.max_batch_tokens))
        self.metrics.batch_tenants.observe(len({j.tenant for j in batch}))
        try:
            results: list[Encoded | BaseException] = list(
                self.lm.encode([j.item for j in batch], batch[0].mode)
            )
        except BaseException as e:  # delivered to every caller in the batch, mapped there
            log.debug("encode batch failed: %s", e)
            results = [e] * len(batch)
        finally:
            with self._cv:
                self._queued_tokens -= sum(j.tokens for j in batch)
        for job, result in zip(batch, results, strict=True):
            job.deliver(job.index, result)
