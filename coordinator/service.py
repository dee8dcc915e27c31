"""The Coordinator gRPC service: authentication, limits, validation and metrics around pema/.

Every method runs inside `_rpc`, which authenticates the caller, counts the call against its
limits, records metrics and maps any exception to a status code through coordinator.errors.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
import torch
from google.protobuf.message import Message
from torch import Tensor

from coordinator.config import CoordinatorConfig, Tenant, hash_token
from coordinator.errors import (
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    to_status,
)
from coordinator.metrics import Metrics
from coordinator.worker import EncodeJob, ModelWorker
from pema.backbone import Encoded, EncodeItem, FrozenLM, LocalSession, MemoryMode
from pema.errors import DataError
from proto import serde
from proto.gen.pemaservice.v1 import coordinator_pb2 as pb
from proto.gen.pemaservice.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MODES = {
    pb.MEMORY_MODE_TEACHER_FORCED: MemoryMode.TEACHER_FORCED,
    pb.MEMORY_MODE_FREE_RUNNING: MemoryMode.FREE_RUNNING,
}
HIDDEN_DTYPES = {"": torch.float16, "float16": torch.float16, "float32": torch.float32}
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
RESULT_POLL_SECONDS = 0.5


@dataclass
class Session:
    id: str
    tenant: str
    local: LocalSession
    rows: int = 0
    length: int = 0
    hidden: Tensor | None = None
    attached: bool = True
    last_used: float = field(default_factory=time.monotonic)


class TenantState:
    """Live counters of one tenant, guarded by the service's lock."""

    def __init__(self, tenant: Tenant) -> None:
        self.tenant = tenant
        self.calls = 0
        self.tokens = 0


class CoordinatorService(pb_grpc.CoordinatorServicer):
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
        self._by_hash = {t.token_sha256: t for t in config.tenants}
        self._state = {t.id: TenantState(t) for t in config.tenants}
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._active_calls = 0
        # Decode streams and encode waits each hold an RPC thread: keep a few for short calls.
        self._max_calls = max(1, config.rpc_threads - 4)
        self._head_chunks: list[pb.HeadChunk] | None = None
        self._head_lock = threading.Lock()

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

    def _check_size(self, msg: Message) -> None:
        size = msg.ByteSize()
        if size > self.config.max_message_bytes:
            raise DataError(
                f"message of {size} bytes exceeds the limit of {self.config.max_message_bytes}; "
                "send fewer items per request"
            )

    @contextmanager
    def _rpc(
        self, method: str, context: grpc.ServicerContext, request: Message | None
    ) -> Iterator[Tenant]:
        start = time.perf_counter()
        tenant_id: str | None = None
        code = grpc.StatusCode.OK
        entered = False
        try:
            tenant = self._authenticate(context)
            tenant_id = tenant.id
            with self._lock:
                state = self._state[tenant.id]
                if self._active_calls >= self._max_calls:
                    raise Unavailable(f"server busy: {self._active_calls} calls in progress")
                if state.calls >= tenant.limits.max_concurrent_calls:
                    raise ResourceExhausted(
                        f"limit max_concurrent_calls ({tenant.limits.max_concurrent_calls}) reached"
                    )
                state.calls += 1
                self._active_calls += 1
                entered = True
            if request is not None:
                self._check_size(request)
            yield tenant
        except GeneratorExit:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as e:
            code, message = to_status(e)
            if code != grpc.StatusCode.INTERNAL:
                log.info("%s %s: %s %s", tenant_id or "-", method, code.name, message)
            context.abort(code, message)
        finally:
            if entered and tenant_id is not None:
                with self._lock:
                    self._state[tenant_id].calls -= 1
                    self._active_calls -= 1
            label = self.metrics.tenant(tenant_id)
            self.metrics.requests.labels(label, method, code.name).inc()
            self.metrics.request_seconds.labels(label, method).observe(time.perf_counter() - start)

    @contextmanager
    def _tokens_in_flight(self, tenant: Tenant, tokens: int) -> Iterator[None]:
        limit = tenant.limits.max_tokens_in_flight
        with self._lock:
            state = self._state[tenant.id]
            if state.tokens + tokens > limit:
                raise ResourceExhausted(
                    f"limit max_tokens_in_flight ({limit}) reached: {state.tokens} in flight, "
                    f"this request adds {tokens}"
                )
            state.tokens += tokens
        try:
            yield
        finally:
            with self._lock:
                self._state[tenant.id].tokens -= tokens

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

    def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> pb.ModelInfo:
        with self._rpc("GetModelInfo", context, request):
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

    def GetTokenizer(
        self, request: pb.GetTokenizerRequest, context: grpc.ServicerContext
    ) -> pb.Tokenizer:
        with self._rpc("GetTokenizer", context, request):
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

    def GetHead(
        self, request: pb.GetHeadRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.HeadChunk]:
        with self._rpc("GetHead", context, request):
            if request.chunk_bytes < 0:
                raise DataError("chunk_bytes must not be negative")
            if request.chunk_bytes and request.chunk_bytes != self.config.head_chunk_bytes:
                yield from serde.head_to_chunks(
                    self.lm.head_spec, self.lm.info.revision, request.chunk_bytes
                )
            else:
                yield from self._head()

    # -- encode ---------------------------------------------------------------------------------

    def Encode(
        self, request: pb.EncodeRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.EncodeResult]:
        with self._rpc("Encode", context, request) as tenant:
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
            held = sum(1 for s in self._sessions.values() if s.tenant == tenant.id)
            if held >= tenant.limits.max_decode_sessions:
                raise ResourceExhausted(
                    f"limit max_decode_sessions ({tenant.limits.max_decode_sessions}) reached"
                )
            session = Session(uuid.uuid4().hex, tenant.id, self.lm.session())
            self._sessions[session.id] = session
            self.metrics.active_sessions.labels(tenant.id).set(held + 1)
        return session

    def _attach(self, tenant: Tenant, session_id: str) -> Session:
        with self._lock:
            self._expire_sessions()
            session = self._sessions.get(session_id)
            if session is None:
                raise NotFound(f"no decode session {session_id!r} (closed or expired)")
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
            held = sum(1 for s in self._sessions.values() if s.tenant == session.tenant)
            self.metrics.active_sessions.labels(session.tenant).set(held)

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
        self, request_iterator: Iterator[pb.DecodeRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.DecodeReply]:
        with self._rpc("Decode", context, None) as tenant:
            session: Session | None = None
            closed = False
            dtype = torch.float16
            try:
                for msg in request_iterator:
                    self._check_size(msg)
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
            finally:
                if session is not None:
                    self._release(session, closed)

    @staticmethod
    def _hidden_dtype(name: str) -> torch.dtype:
        if name not in HIDDEN_DTYPES:
            raise DataError(f"hidden_dtype must be float16 or float32, got {name!r}")
        return HIDDEN_DTYPES[name]

    def _start(self, tenant: Tenant, start: pb.DecodeStart) -> Session:
        prompts = [list(p.ids) for p in start.prompts]
        if not prompts:
            raise DataError("decode start carries no prompts")
        for i, p in enumerate(prompts):
            self._check_sequence(tenant, p, len(p), f"prompt {i}")
        tokens = sum(len(p) for p in prompts)
        with self._tokens_in_flight(tenant, tokens):
            session = self._new_session(tenant)
            try:
                session.hidden = self.worker.call(lambda: session.local.start(prompts)).result()
            except BaseException:
                with self._lock:
                    self._drop(session)
                raise
        session.rows = len(prompts)
        session.length = max(len(p) for p in prompts)
        self.metrics.tokens.labels(tenant.id, "decode_prompt").inc(tokens)
        return session

    def _step(self, tenant: Tenant, session: Session, tokens: list[int]) -> None:
        if len(tokens) != session.rows:
            raise DataError(f"expected {session.rows} tokens (one per sequence), got {len(tokens)}")
        length = session.length + 1
        self._check_sequence(tenant, tokens, length, "step")
        session.hidden = self.worker.step(session.local, tokens).result()
        session.length = length
        session.last_used = time.monotonic()
        self.metrics.tokens.labels(tenant.id, "decode_step").inc(len(tokens))
