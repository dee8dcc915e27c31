"""The Coordinator gRPC service: authentication, limits, validation and metrics around pema/.

Every method runs inside `_rpc`, which authenticates the caller, admits the call under the
fair-admission rule below, records metrics and maps any exception to a status code through
coordinator.errors. Requests arrive as raw bytes (see `method_handlers`) and are parsed inside
that frame, after authentication: an undecodable message is INVALID_ARGUMENT like any bad input,
never grpcio's INTERNAL "Exception deserializing request!".

Admission: the server admits at most `rpc_threads - RPC_HEADROOM` calls at once, each tenant at
most its `max_concurrent_calls`, and every tenant has `reserved_calls` of the server-wide budget
to itself: a call that would eat into another tenant's unused reservation is UNAVAILABLE. So no
set of tenants within their own limits can deny a call to a tenant that holds fewer than its
reservation.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import torch
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from torch import Tensor

from coordinator.config import RPC_HEADROOM, CoordinatorConfig, Tenant, hash_token
from coordinator.errors import (
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    clip,
    to_status,
)
from coordinator.metrics import Metrics
from coordinator.worker import EncodeJob, ModelWorker
from pema.backbone import Encoded, EncodeItem, FrozenLM, LocalSession, MemoryMode
from pema.errors import DataError
from proto import serde
from proto.gen.pemaservice.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)

MODES = {
    pb.MEMORY_MODE_TEACHER_FORCED: MemoryMode.TEACHER_FORCED,
    pb.MEMORY_MODE_FREE_RUNNING: MemoryMode.FREE_RUNNING,
}
HIDDEN_DTYPES = {"": torch.float16, "float16": torch.float16, "float32": torch.float32}
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
RESULT_POLL_SECONDS = 0.5
# The smallest GetHead chunk a caller may ask for: below it the per-message overhead dominates
# (chunk_bytes=1 streamed ~12,000 messages/s and would take over an hour for the default head).
MIN_HEAD_CHUNK_BYTES = 64 << 10
DEADLINE_SLACK_SECONDS = 1.0
SETTLE_SECONDS = 0.05


@dataclass
class Session:
    id: str
    tenant: str
    local: LocalSession
    rows: int = 0
    length: int = 0
    hidden: Tensor | None = None
    charged: int = 0  # KV-cache tokens (rows x length) counted in the tenant's token budget
    attached: bool = True
    last_used: float = field(default_factory=time.monotonic)


class TenantState:
    """Live counters of one tenant, guarded by the service's lock."""

    def __init__(self, tenant: Tenant) -> None:
        self.tenant = tenant
        self.calls = 0
        self.tokens = 0


def past_deadline(context: grpc.ServicerContext, slack: float = 0.0) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= slack


def ended_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    """Why a call the client no longer waits for ended: its deadline passed, or it cancelled.

    The client's clock fires first and cancels; the server's copy of the deadline (the timeout
    as received) passes a moment later, so a call ending within DEADLINE_SLACK_SECONDS of it
    counts as DEADLINE_EXCEEDED."""
    if past_deadline(context, DEADLINE_SLACK_SECONDS):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def settle(context: grpc.ServicerContext) -> None:
    """After a request stream ended without a close message: a client that cancelled (or hit
    its deadline) ends the stream the same way, and its cancellation shows a moment later. Wait
    that moment, so the call is counted as what it was."""
    until = time.monotonic() + SETTLE_SECONDS
    while context.is_active() and time.monotonic() < until:
        time.sleep(0.005)


class CoordinatorService:
    """The Coordinator service; `method_handlers` registers it with raw-bytes requests."""

    def __init__(
        self,
        config: CoordinatorConfig,
        lm: FrozenLM,
        tokenizer_files: dict[str, bytes],
        worker: ModelWorker,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.lm = lm
        self.tokenizer_files = tokenizer_files
        self.worker = worker
        self.metrics = metrics
        self._by_hash = {h: t for t in config.tenants for h in t.token_sha256}
        self._state = {t.id: TenantState(t) for t in config.tenants}
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._active_calls = 0
        self._in_flight: dict[tuple[str, str], int] = {}  # (tenant, method) -> calls
        # Decode streams and encode waits each hold an RPC thread: keep a few for admission.
        self._max_calls = max(1, config.rpc_threads - RPC_HEADROOM)
        self._head_chunks: list[pb.HeadChunk] | None = None
        self._head_lock = threading.Lock()

    def reload_tenants(self, tenants: tuple[Tenant, ...]) -> None:
        """Swap the tenant registry (SIGHUP): new tokens and limits apply to new calls; calls and
        decode sessions in flight continue, also those of a tenant that was removed."""
        with self._lock:
            self.config = self.config.with_(tenants=tenants)
            self._by_hash = {h: t for t in tenants for h in t.token_sha256}
            for t in tenants:
                if t.id in self._state:
                    self._state[t.id].tenant = t
                else:
                    self._state[t.id] = TenantState(t)

    @property
    def calls_in_flight(self) -> int:
        return self._active_calls

    @property
    def max_calls(self) -> int:
        return self._max_calls

    # -- the frame around every call ------------------------------------------------------------

    def _authenticate(self, context: grpc.ServicerContext) -> Tenant:
        for key, value in context.invocation_metadata():
            if key == "authorization":
                scheme, _, token = str(value).partition(" ")
                if scheme.lower() != "bearer" or not token:
                    raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
                tenant = self._by_hash.get(hash_token(token.strip()))
                if tenant is None:
                    raise Unauthenticated("unknown token")
                return tenant
        raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")

    def _parse(self, cls: type[M], raw: bytes) -> M:
        """A request from its wire bytes: size first, then protobuf; both are bad input."""
        if len(raw) > self.config.max_message_bytes:
            raise DataError(
                f"message of {len(raw)} bytes exceeds the limit of "
                f"{self.config.max_message_bytes}; send fewer items per request"
            )
        try:
            return cls.FromString(raw)
        except (DecodeError, ValueError) as e:
            raise DataError(f"undecodable {cls.DESCRIPTOR.name}: {clip(str(e))}") from None

    def _admit(self, tenant: Tenant) -> None:
        """Count a call in, or refuse it (lock held). See the module docstring."""
        state = self._state[tenant.id]
        limit = tenant.limits.max_concurrent_calls
        if state.calls >= limit:
            raise ResourceExhausted(f"limit max_concurrent_calls ({limit}) reached")
        if state.calls >= self.config.reserved_calls:
            # Tenants removed by a reload keep their state for calls in flight, not a reservation.
            others = sum(
                max(0, self.config.reserved_calls - self._state[t.id].calls)
                for t in self.config.tenants
                if t.id != tenant.id
            )
            if self._active_calls + 1 + others > self._max_calls:
                raise Unavailable(
                    f"server busy: {self._active_calls} calls in progress; retry later"
                )
        state.calls += 1
        self._active_calls += 1

    def in_flight(self) -> dict[tuple[str, str], int]:
        """Calls running now by (tenant, method): what a shutdown past its grace cuts off."""
        with self._lock:
            return {k: n for k, n in self._in_flight.items() if n}

    @contextmanager
    def _rpc(self, method: str, context: grpc.ServicerContext) -> Iterator[Tenant]:
        start = time.perf_counter()
        tenant_id: str | None = None
        code = grpc.StatusCode.OK
        entered = False
        try:
            tenant = self._authenticate(context)
            tenant_id = tenant.id
            with self._lock:
                self._admit(tenant)
                entered = True
                key = (tenant.id, method)
                self._in_flight[key] = self._in_flight.get(key, 0) + 1
            yield tenant
        except GeneratorExit:
            # The response stream was closed under us: the client went away or its deadline hit.
            code = ended_code(context)
            raise
        except grpc.RpcError:
            # Raised by a request iterator whose call is over (cancelled, deadline, shutdown):
            # there is nobody to answer, and nothing went wrong on this side.
            code = ended_code(context)
        except Exception as e:
            code, message = to_status(e)
            if code != grpc.StatusCode.INTERNAL:
                log.info("%s %s: %s %s", tenant_id or "-", method, code.name, message)
            if context.is_active():
                context.abort(code, message)
            code = ended_code(context)
        finally:
            # A deadline that passes while a request stream is read ends that stream like a
            # half-close, a moment before the server's copy of the deadline: the handler returns
            # normally, but nobody receives its answer.
            if code == grpc.StatusCode.OK and (
                not context.is_active() or past_deadline(context, DEADLINE_SLACK_SECONDS)
            ):
                code = ended_code(context)
            if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
                log.info("%s %s: %s", tenant_id or "-", method, code.name)
            if entered and tenant_id is not None:
                with self._lock:
                    self._state[tenant_id].calls -= 1
                    self._active_calls -= 1
                    self._in_flight[(tenant_id, method)] -= 1
            label = self.metrics.tenant(tenant_id)
            self.metrics.requests.labels(label, method, code.name).inc()
            self.metrics.request_seconds.labels(label, method).observe(time.perf_counter() - start)

    def _charge(self, tenant: Tenant, tokens: int) -> None:
        """Count tokens against the tenant's max_tokens_in_flight, or refuse them."""
        limit = tenant.limits.max_tokens_in_flight
        with self._lock:
            state = self._state[tenant.id]
            if state.tokens + tokens > limit:
                raise ResourceExhausted(
                    f"limit max_tokens_in_flight ({limit}) reached: {state.tokens} in flight or "
                    f"held by decode sessions, this request adds {tokens}"
                )
            state.tokens += tokens

    def _refund(self, tenant_id: str, tokens: int) -> None:
        """Give tokens back to the budget (lock held)."""
        self._state[tenant_id].tokens -= tokens

    @contextmanager
    def _tokens_in_flight(self, tenant: Tenant, tokens: int) -> Iterator[None]:
        self._charge(tenant, tokens)
        try:
            yield
        finally:
            with self._lock:
                self._refund(tenant.id, tokens)

    def _check_sequence(self, tenant: Tenant, ids: Sequence[int], total: int, what: str) -> None:
        """Ids in the vocabulary and lengths within the model's and the tenant's limits."""
        self.lm.validate_ids(ids, what)
        if total > self.lm.info.max_length:
            raise DataError(
                f"{what}: {total} tokens exceed the model's limit of {self.lm.info.max_length}"
            )
        if total > tenant.limits.max_sequence_length:
            raise ResourceExhausted(
                f"limit max_sequence_length ({tenant.limits.max_sequence_length}) exceeded by "
                f"{what} ({total} tokens)"
            )

    # -- metadata, tokenizer, head --------------------------------------------------------------

    def GetModelInfo(self, raw: bytes, context: grpc.ServicerContext) -> pb.ModelInfo:
        with self._rpc("GetModelInfo", context):
            self._parse(pb.GetModelInfoRequest, raw)
            i = self.lm.info
            return pb.ModelInfo(
                name=i.name,
                revision=i.revision,
                hidden_size=i.hidden_size,
                vocab_size=i.vocab_size,
                max_length=i.max_length,
                dtype=i.dtype,
                norm_kind=i.norm_kind,
            )
        raise AssertionError("unreachable")  # _rpc aborts on error

    def GetTokenizer(self, raw: bytes, context: grpc.ServicerContext) -> pb.Tokenizer:
        with self._rpc("GetTokenizer", context):
            self._parse(pb.GetTokenizerRequest, raw)
            return pb.Tokenizer(
                revision=self.lm.info.revision,
                files=[
                    pb.TokenizerFile(name=n, content=c)
                    for n, c in sorted(self.tokenizer_files.items())
                ],
            )
        raise AssertionError("unreachable")

    def _head(self) -> list[pb.HeadChunk]:
        with self._head_lock:
            if self._head_chunks is None:
                self._head_chunks = list(
                    serde.head_to_chunks(
                        self.lm.head_spec, self.lm.info.revision, self.config.head_chunk_bytes
                    )
                )
            return self._head_chunks

    def GetHead(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[pb.HeadChunk]:
        with self._rpc("GetHead", context):
            request = self._parse(pb.GetHeadRequest, raw)
            if request.chunk_bytes and request.chunk_bytes < MIN_HEAD_CHUNK_BYTES:
                raise DataError(
                    f"chunk_bytes must be 0 (the server's default) or at least "
                    f"{MIN_HEAD_CHUNK_BYTES}, got {request.chunk_bytes}"
                )
            if request.chunk_bytes and request.chunk_bytes != self.config.head_chunk_bytes:
                yield from serde.head_to_chunks(
                    self.lm.head_spec, self.lm.info.revision, request.chunk_bytes
                )
            else:
                yield from self._head()

    # -- encode ---------------------------------------------------------------------------------

    def Encode(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[pb.EncodeResult]:
        with self._rpc("Encode", context) as tenant:
            request = self._parse(pb.EncodeRequest, raw)
            mode = MODES.get(request.mode)
            if mode is None:
                raise DataError(
                    f"mode must be MEMORY_MODE_TEACHER_FORCED or MEMORY_MODE_FREE_RUNNING, "
                    f"got {request.mode}"
                )
            if not request.items:
                raise DataError("no items to encode")
            if len(request.items) > self.config.max_items_per_request:
                raise DataError(
                    f"{len(request.items)} items exceed the limit of "
                    f"{self.config.max_items_per_request} per request"
                )
            items: list[EncodeItem] = []
            for i, it in enumerate(request.items):
                prompt, target = list(it.prompt), list(it.target)
                total = len(prompt) + len(target)
                self._check_sequence(tenant, prompt, total, f"item {i}: prompt")
                self._check_sequence(tenant, target, total, f"item {i}: target")
                items.append(EncodeItem(prompt, target))
            tokens = sum(len(it.prompt) + len(it.target) for it in items)
            with self._tokens_in_flight(tenant, tokens):
                yield from self._encode(tenant, items, mode, context)

    def _encode(
        self,
        tenant: Tenant,
        items: list[EncodeItem],
        mode: MemoryMode,
        context: grpc.ServicerContext,
    ) -> Iterator[pb.EncodeResult]:
        results: queue.SimpleQueue[tuple[int, Encoded | BaseException]] = queue.SimpleQueue()
        cancelled = threading.Event()
        context.add_callback(cancelled.set)
        jobs = [
            EncodeJob(tenant.id, i, item, mode, lambda i, r: results.put((i, r)), cancelled)
            for i, item in enumerate(items)
        ]
        self.worker.submit_encode(jobs)
        self.metrics.tokens.labels(tenant.id, "encode_input").inc(sum(j.tokens for j in jobs))
        try:
            for _ in items:
                while True:
                    try:
                        index, result = results.get(timeout=RESULT_POLL_SECONDS)
                        break
                    except queue.Empty:
                        if not context.is_active():
                            return
                if isinstance(result, BaseException):
                    raise result
                keys = result.keys
                self.metrics.tokens.labels(tenant.id, "keys").inc(keys.shape[0])
                if result.generated is not None:
                    self.metrics.tokens.labels(tenant.id, "generated").inc(len(result.generated))
                yield pb.EncodeResult(
                    index=index,
                    keys=serde.tensor_to_proto(keys, serde.key_dtype(keys)),
                    generated=result.generated or [],
                )
        finally:
            cancelled.set()  # items still queued are dropped by the worker

    # -- decode sessions ------------------------------------------------------------------------

    def _new_session(self, tenant: Tenant) -> Session:
        with self._lock:
            self._expire_sessions()
            held = [s for s in self._sessions.values() if s.tenant == tenant.id]
            if len(held) >= tenant.limits.max_decode_sessions:
                # A tenant at its limit that starts a new session gives up its oldest detached
                # one (a dropped stream it did not resume) instead of waiting out the window.
                detached = [s for s in held if not s.attached]
                if not detached:
                    raise ResourceExhausted(
                        f"limit max_decode_sessions ({tenant.limits.max_decode_sessions}) reached"
                    )
                oldest = min(detached, key=lambda s: s.last_used)
                log.info("%s: decode session replaced by a new one", tenant.id)
                self._drop(oldest)
            session = Session(uuid.uuid4().hex, tenant.id, self.lm.session())
            self._sessions[session.id] = session
            self._publish_sessions(tenant.id)
        return session

    def _publish_sessions(self, tenant_id: str) -> None:
        """The active-sessions gauge of one tenant (lock held)."""
        held = sum(1 for s in self._sessions.values() if s.tenant == tenant_id)
        self.metrics.active_sessions.labels(tenant_id).set(held)

    def _attach(self, tenant: Tenant, session_id: str) -> Session:
        with self._lock:
            self._expire_sessions()
            session = self._sessions.get(session_id)
            if session is None:
                raise NotFound(f"no decode session {clip(session_id)!r} (closed or expired)")
            if session.tenant != tenant.id:
                raise PermissionDenied("the decode session belongs to another tenant")
            if session.attached:
                raise DataError("the decode session is attached to another stream")
            session.attached = True
            return session

    def _release(self, session: Session, close: bool) -> None:
        with self._lock:
            session.attached = False
            session.last_used = time.monotonic()
            if close or session.hidden is None:
                self._drop(session)

    def _drop(self, session: Session) -> None:
        """Forget a session (lock held)."""
        if self._sessions.pop(session.id, None) is not None:
            session.local.close()
            self._refund(session.tenant, session.charged)
            session.charged = 0
            self._publish_sessions(session.tenant)

    def _expire_sessions(self) -> None:
        """Drop detached sessions idle for longer than the resume window (lock held)."""
        cutoff = time.monotonic() - self.config.session_idle_seconds
        for s in [s for s in self._sessions.values() if not s.attached and s.last_used < cutoff]:
            self._drop(s)

    def expire_sessions(self) -> None:
        with self._lock:
            self._expire_sessions()

    def _reply(self, session: Session, dtype: torch.dtype) -> pb.DecodeReply:
        assert session.hidden is not None
        return pb.DecodeReply(
            session_id=session.id,
            hidden=serde.tensor_to_proto(session.hidden, dtype),
            length=session.length,
        )

    def Decode(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[pb.DecodeReply]:
        with self._rpc("Decode", context) as tenant:
            session: Session | None = None
            closed = False
            dtype = torch.float16
            try:
                for raw in request_iterator:
                    msg = self._parse(pb.DecodeRequest, raw)
                    kind = msg.WhichOneof("kind")
                    if kind == "close":
                        closed = True
                        break
                    if kind in ("start", "resume") and session is not None:
                        raise DataError("the stream already has a session")
                    if kind == "start":
                        dtype = self._hidden_dtype(msg.start.hidden_dtype)
                        session = self._start(tenant, msg.start)
                    elif kind == "resume":
                        dtype = self._hidden_dtype(msg.resume.hidden_dtype)
                        session = self._attach(tenant, msg.resume.session_id)
                    elif kind == "step":
                        if session is None:
                            raise DataError("the first decode message must be start or resume")
                        self._step(tenant, session, list(msg.step.tokens))
                    else:
                        raise DataError("empty decode message")
                    yield self._reply(session, dtype)
                else:
                    settle(context)
            finally:
                if session is not None:
                    self._release(session, closed)

    @staticmethod
    def _hidden_dtype(name: str) -> torch.dtype:
        if name not in HIDDEN_DTYPES:
            raise DataError(f"hidden_dtype must be float16 or float32, got {clip(name)!r}")
        return HIDDEN_DTYPES[name]

    def _start(self, tenant: Tenant, start: pb.DecodeStart) -> Session:
        prompts = [list(p.ids) for p in start.prompts]
        if not prompts:
            raise DataError("decode start carries no prompts")
        for i, p in enumerate(prompts):
            self._check_sequence(tenant, p, len(p), f"prompt {i}")
        tokens = sum(len(p) for p in prompts)
        length = max(len(p) for p in prompts)
        # The KV cache holds rows x longest prompt (padded) for the session's whole life: it is
        # charged to the tenant's token budget until the session is dropped.
        self._charge(tenant, len(prompts) * length)
        try:
            session = self._new_session(tenant)
        except BaseException:
            with self._lock:
                self._refund(tenant.id, len(prompts) * length)
            raise
        session.charged = len(prompts) * length
        try:
            session.hidden = self.worker.call(lambda: session.local.start(prompts)).result()
        except BaseException:
            with self._lock:
                self._drop(session)
            raise
        session.rows = len(prompts)
        session.length = length
        self.metrics.tokens.labels(tenant.id, "decode_prompt").inc(tokens)
        return session

    def _step(self, tenant: Tenant, session: Session, tokens: list[int]) -> None:
        if len(tokens) != session.rows:
            raise DataError(f"expected {session.rows} tokens (one per sequence), got {len(tokens)}")
        length = session.length + 1
        self._check_sequence(tenant, tokens, length, "step")
        self._charge(tenant, session.rows)  # one more cached token per row
        with self._lock:
            session.charged += session.rows
        session.hidden = self.worker.step(session.local, tokens).result()
        session.length = length
        session.last_used = time.monotonic()
        self.metrics.tokens.labels(tenant.id, "decode_step").inc(len(tokens))


def method_handlers(
    descriptor: ServiceDescriptor,
    servicer: object,
    pool: futures.ThreadPoolExecutor | None = None,
    raw_requests: bool = False,
) -> grpc.GenericRpcHandler:
    """gRPC handlers for every method of `descriptor`, served by `servicer`'s same-named methods.

    raw_requests: the methods receive the request bytes and parse them themselves (so a malformed
    message is their INVALID_ARGUMENT, after authentication, instead of grpcio's INTERNAL).
    pool: run the methods on this thread pool instead of the server's (health and reflection get
    small pools of their own, so they neither starve nor are starved by the tenants' calls)."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in descriptor.methods:
        behavior: Callable[..., Any] = getattr(servicer, method.name)
        if pool is not None:
            behavior = _on_pool(behavior, pool)
        deserializer = None if raw_requests else GetMessageClass(method.input_type).FromString
        serializer = GetMessageClass(method.output_type).SerializeToString
        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(
            behavior, request_deserializer=deserializer, response_serializer=serializer
        )
    return grpc.method_handlers_generic_handler(descriptor.full_name, handlers)


def _on_pool(behavior: Callable[..., Any], pool: futures.ThreadPoolExecutor) -> Callable[..., Any]:
    """The behavior, marked for grpcio to run it on `pool` (its experimental_thread_pool hook)."""

    def run(*args: Any) -> Any:
        return behavior(*args)

    run.experimental_thread_pool = pool  # type: ignore[attr-defined]
    # Health's Watch answers through a callback instead of holding a thread: keep that.
    run.experimental_non_blocking = getattr(behavior, "experimental_non_blocking", False)  # type: ignore[attr-defined]
    return run
