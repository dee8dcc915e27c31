"""The tenant's view of a remote coordinator: the pema Backbone protocol over gRPC.

Every call has a deadline; calls that fail with UNAVAILABLE (overload, restart, network) are
retried with exponential backoff (tenacity) for `retry_seconds` in all (default 2 minutes: long
enough for a coordinator pod to restart), and no other status is retried. A streaming call is
retried only if it failed before its first message arrived, so nothing is ever delivered twice;
an Encode stream broken midway is asked again for the items it had not yet returned.

The head and the tokenizer are downloaded once and cached on disk under
pema.models.cache_dir()/heads/<revision>.safetensors and /tokenizers/<revision>/.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import shutil
import socket
import ssl
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)
from torch import Tensor
from transformers import AutoTokenizer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from pema.backbone import Encoded, EncodeItem, MemoryMode, ModelInfo
from pema.errors import DataError, ModelError, PemaError
from pema.head import LMHead, load_head, save_head
from pema.models import cache_dir
from proto import serde
from proto.gen.pemaservice.v1 import coordinator_pb2 as pb
from proto.gen.pemaservice.v1 import coordinator_pb2_grpc as pb_grpc
from proto.tls import read_pem

log = logging.getLogger(__name__)
T = TypeVar("T")
MODES = {
    MemoryMode.TEACHER_FORCED: pb.MEMORY_MODE_TEACHER_FORCED,
    MemoryMode.FREE_RUNNING: pb.MEMORY_MODE_FREE_RUNNING,
}
_CLOSE = object()


class CoordinatorError(PemaError):
    """A call to the coordinator failed; the message carries its status code and details."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"coordinator {method}: {code.name}: {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True)
class TlsOptions:
    """Server verification (ca) and, for mutual TLS, this tenant's certificate and key."""

    ca: Path | None = None  # None: the system's roots
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None  # override the name checked in the server's certificate

    @classmethod
    def named(cls, ca: Path | None, cert: Path | None, key: Path | None) -> TlsOptions | None:
        """TLS when any of its files is named, else None (plaintext)."""
        return cls(ca, cert, key) if ca or cert or key else None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise PemaError("a client certificate needs its key, and the key its certificate")
        self.pem()  # a wrong path is one line now, not a traceback or a failed handshake later

    def pem(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(CA, key, certificate chain) as PEM bytes."""
        return (
            read_pem(self.ca, "CA certificate") if self.ca else None,
            read_pem(self.key, "client key") if self.key else None,
            read_pem(self.cert, "client certificate") if self.cert else None,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        ca, key, chain = self.pem()
        return grpc.ssl_channel_credentials(ca, key, chain)


@dataclass(frozen=True)
class ClientConfig:
    address: str
    token: str
    tls: TlsOptions | None = None
    timeout: float = 60.0  # unary calls and each encode request
    stream_timeout: float = 3600.0  # a whole decode session or head download
    # UNAVAILABLE is retried for this long in all (0: never); the pod restart of a coordinator
    # takes about a minute. Flower node config: coordinator-retry-seconds.
    retry_seconds: float = 120.0
    backoff: float = 0.2  # first retry delay in seconds, doubled each time (with jitter)
    max_backoff: float = 5.0
    max_request_tokens: int = 16384  # tokens per Encode request (under the tenant's quota)
    max_request_items: int = 512
    decode_dtype: str = "float16"  # "float32" makes remote decoding bit-exact with local

    def __post_init__(self) -> None:
        if not self.address or ":" not in self.address:
            raise PemaError(f"coordinator address must be HOST:PORT, got {self.address!r}")
        if not self.token:
            raise PemaError("a coordinator token is required (--token or PEMA_TOKEN)")
        if self.timeout <= 0 or self.stream_timeout <= 0 or self.retry_seconds < 0:
            raise PemaError("timeouts must be positive and the retry budget not negative")
        if self.backoff <= 0 or self.max_backoff < self.backoff:
            raise PemaError("backoff must be positive and at most max_backoff")
        if self.decode_dtype not in ("float16", "float32"):
            raise PemaError(f"decode_dtype must be float16 or float32, got {self.decode_dtype!r}")


def _unavailable(e: BaseException) -> bool:
    if isinstance(e, CoordinatorTlsError):
        return False
    if isinstance(e, CoordinatorError):
        return e.code == grpc.StatusCode.UNAVAILABLE
    return isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.UNAVAILABLE


def _error(method: str, e: grpc.RpcError) -> CoordinatorError:
    code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = e.details() if isinstance(e, grpc.Call) else str(e)
    return CoordinatorError(method, code, details or "")


class CoordinatorTlsError(CoordinatorError):
    """Tenant and coordinator disagree about TLS: a configuration error, never retried."""

    def __init__(self, address: str, reason: str) -> None:
        PemaError.__init__(self, f"coordinator {address}: {reason}")
        self.code = grpc.StatusCode.UNAVAILABLE
        self.details = reason


def _probe_tls(address: str, tls: TlsOptions | None) -> str:
    """Ask the server directly what gRPC only reports as "Socket closed": "tls" (it completed a
    TLS handshake and took this client), "refused" (TLS, but it refused this client's
    certificate or the lack of one) or "other" (no TLS, or not reachable)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Only the protocol is in question here; gRPC verifies the certificate on the real channel.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        if tls is not None and tls.cert and tls.key:
            ctx.load_cert_chain(tls.cert, tls.key)
        with (
            socket.create_connection((host, int(port)), timeout=3) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as s,
        ):
            # TLS 1.3 sends the verdict on a client certificate after the handshake: a gRPC
            # server that accepts us sends its HTTP/2 settings, one that refuses an alert.
            s.settimeout(3)
            try:
                return "tls" if s.recv(1) else "refused"
            except ssl.SSLError:
                return "refused"
            except TimeoutError:
                return "tls"
    except (OSError, ValueError):  # ssl.SSLError included: the server does not speak TLS
        return "other"


def tls_diagnosis(address: str, tls: TlsOptions | None, details: str) -> str | None:
    """The TLS misconfiguration behind a failed connection, in words; None when the failure is
    not about TLS (an unreachable or restarting server is retried as usual)."""
    d = details.lower()
    if "wrong_version_number" in d:
        return (
            "the server does not use TLS: drop --tls-ca/--tls-cert/--tls-key, or turn TLS on at "
            "the coordinator"
        )
    if tls is not None and ("handshake failed" in d or "hostname verification" in d):
        reason = re.search(r"OPENSSL_internal:([A-Z_]+)", details)
        why = reason.group(1) if reason else "its name does not match " + address
        return (
            f"certificate not trusted: the server's certificate does not verify against "
            f"{tls.ca or 'the system CAs'} ({why})"
        )
    if "socket closed" in d or "connection reset" in d:
        verdict = _probe_tls(address, tls)
        if tls is None and verdict in ("tls", "refused"):
            return "the server requires TLS: pass --tls-ca with the CA that signed its certificate"
        if tls is not None and verdict == "refused":
            what = "its CA did not sign this one" if tls.cert else "none was given"
            return (
                f"the server requires a client certificate (mutual TLS) and {what}: "
                "pass --tls-cert and --tls-key"
            )
    return None


class CoordinatorClient:
    """Typed calls to one coordinator."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", 256 << 20),
            ("grpc.max_send_message_length", 64 << 20),
            # gRPC's own reconnect backoff grows to 2 minutes; a restarted coordinator should be
            # found again within the retry schedule's few seconds.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 5000),
        ]
        if config.tls is not None:
            if config.tls.server_name:
                options.append(("grpc.ssl_target_name_override", config.tls.server_name))
            self.channel = grpc.secure_channel(config.address, config.tls.credentials(), options)
        else:
            self.channel = grpc.insecure_channel(config.address, options)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.metadata = (("authorization", f"Bearer {config.token}"),)

    def close(self) -> None:
        self.channel.close()

    def retrying(self, method: str) -> Retrying:
        """Retry UNAVAILABLE (raw gRPC errors or CoordinatorError) with backoff, within the
        budget; the last error is raised as it came."""
        cfg = self.config

        def note(state: RetryCallState) -> None:
            err = state.outcome.exception() if state.outcome is not None else None
            if isinstance(err, grpc.RpcError):
                err = _error(method, err)
            log.warning(
                "%s unavailable (%s); retrying in %.1f s (%.0f of %.0f s spent)",
                method,
                err.details if isinstance(err, CoordinatorError) else err,
                state.upcoming_sleep,
                state.seconds_since_start,
                cfg.retry_seconds,
            )

        return Retrying(
            retry=retry_if_exception(_unavailable),
            wait=wait_exponential_jitter(initial=cfg.backoff, max=cfg.max_backoff),
            stop=stop_after_delay(cfg.retry_seconds),
            before_sleep=note,
            reraise=True,
        )

    def _retry(self, method: str, fn: Callable[[], T]) -> T:
        try:
            return self.retrying(method)(lambda: self._tls_checked(method, fn))
        except grpc.RpcError as e:
            raise _error(method, e) from None

    def _tls_checked(self, method: str, fn: Callable[[], T]) -> T:
        """A TLS mismatch looks like UNAVAILABLE to gRPC: name it and never retry it."""
        try:
            return fn()
        except grpc.RpcError as e:
            err = _error(method, e)
            if err.code == grpc.StatusCode.UNAVAILABLE:
                tls = tls_diagnosis(self.config.address, self.config.tls, err.details)
                if tls is not None:
                    raise CoordinatorTlsError(self.config.address, tls) from None
            raise

    def _stream(self, method: str, start: Callable[[], Iterator[T]]) -> Iterator[T]:
        """Iterate a server stream, retrying on UNAVAILABLE only before its first message."""

        def first() -> tuple[Iterator[T], T | None]:
            it = start()
            return it, next(it, None)

        it, head = self._retry(method, first)
        if head is None:
            return
        yield head
        try:
            yield from it
        except grpc.RpcError as e:
            raise _error(method, e) from None

    def model_info(self) -> ModelInfo:
        r = self._retry(
            "GetModelInfo",
            lambda: self.stub.GetModelInfo(
                pb.GetModelInfoRequest(), metadata=self.metadata, timeout=self.config.timeout
            ),
        )
        return ModelInfo(
            name=r.name,
            revision=r.revision,
            hidden_size=r.hidden_size,
            vocab_size=r.vocab_size,
            max_length=r.max_length,
            dtype=r.dtype,
            norm_kind=r.norm_kind,
        )

    def tokenizer_files(self) -> tuple[str, dict[str, bytes]]:
        r = self._retry(
            "GetTokenizer",
            lambda: self.stub.GetTokenizer(
                pb.GetTokenizerRequest(), metadata=self.metadata, timeout=self.config.timeout
            ),
        )
        return r.revision, {f.name: f.content for f in r.files}

    def head_chunks(self) -> Iterator[pb.HeadChunk]:
        return self._stream(
            "GetHead",
            lambda: self.stub.GetHead(
                pb.GetHeadRequest(), metadata=self.metadata, timeout=self.config.stream_timeout
            ),
        )

    def encode_request(
        self, items: Sequence[EncodeItem], mode: MemoryMode
    ) -> Iterator[pb.EncodeResult]:
        request = pb.EncodeRequest(mode=MODES[mode], items=[wire_item(i, mode) for i in items])
        return self._stream(
            "Encode",
            lambda: self.stub.Encode(request, metadata=self.metadata, timeout=self.config.timeout),
        )

    def decode_stream(self, requests: Iterator[pb.DecodeRequest]) -> Iterator[pb.DecodeReply]:
        return self.stub.Decode(
            requests, metadata=self.metadata, timeout=self.config.stream_timeout
        )


def wire_item(item: EncodeItem, mode: MemoryMode) -> pb.EncodeItem:
    """What an Encode request carries of one training pair: the allow-list. Teacher forcing
    needs the gold target as the model's input; free-running decodes from the prompt alone and
    reads only how many steps to take, so zeros stand in for the target: the labels stay with
    the tenant, and the owner learns each target's length in tokens, nothing more."""
    target = list(item.target) if mode == MemoryMode.TEACHER_FORCED else [0] * len(item.target)
    return pb.EncodeItem(prompt=list(item.prompt), target=target)


def _cached_dir(root: Path, name: str, files: dict[str, bytes]) -> Path:
    """Write files into root/name atomically (a temp folder renamed into place)."""
    target = root / name
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        for fname, content in files.items():
            if Path(fname).name != fname or fname.startswith("."):
                raise ModelError(f"the coordinator sent a suspicious tokenizer file name {fname!r}")
            (tmp / fname).write_bytes(content)
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class RemoteSession:
    """A DecodeSession over one bidirectional Decode stream (the KV cache stays remote)."""

    def __init__(self, client: CoordinatorClient) -> None:
        self.client = client
        self._requests: queue.SimpleQueue[pb.DecodeRequest | object] = queue.SimpleQueue()
        self._replies: Iterator[pb.DecodeReply] | None = None
        self.session_id: str | None = None
        self.rows = 0

    @staticmethod
    def _outgoing(
        requests: queue.SimpleQueue[pb.DecodeRequest | object],
    ) -> Iterator[pb.DecodeRequest]:
        while True:
            msg = requests.get()
            if msg is _CLOSE:
                return
            assert isinstance(msg, pb.DecodeRequest)
            yield msg

    def _exchange(self, msg: pb.DecodeRequest) -> Tensor:
        if self._replies is None:
            raise ModelError("session not started")
        self._requests.put(msg)
        try:
            reply = next(self._replies)
        except grpc.RpcError as e:
            self._abandon()
            raise _error("Decode", e) from None
        except StopIteration:
            self._abandon()
            raise CoordinatorError("Decode", grpc.StatusCode.UNKNOWN, "stream ended") from None
        self.session_id = reply.session_id
        h = serde.tensor_from_proto(reply.hidden).float()
        if h.dim() != 2 or h.shape[0] != self.rows:
            raise DataError(f"decode reply of shape {tuple(h.shape)}, expected {self.rows} rows")
        return h

    def start(self, prompts: Sequence[Sequence[int]]) -> Tensor:
        if self._replies is not None:
            raise ModelError("session already started")
        msg = pb.DecodeRequest(
            start=pb.DecodeStart(
                prompts=[pb.Prompt(ids=list(p)) for p in prompts],
                hidden_dtype=self.client.config.decode_dtype,
            )
        )
        self.rows = len(prompts)

        # Only the opening exchange is retried: later steps depend on the remote KV cache.
        def opening() -> Tensor:
            self._requests = queue.SimpleQueue()
            self._replies = self.client.decode_stream(self._outgoing(self._requests))
            self._requests.put(msg)
            try:
                reply = next(self._replies)
            except grpc.RpcError:
                self._abandon()
                raise
            self.session_id = reply.session_id
            return serde.tensor_from_proto(reply.hidden).float()

        return self.client._retry("Decode", opening)

    def step(self, tokens: Sequence[int]) -> Tensor:
        return self._exchange(pb.DecodeRequest(step=pb.DecodeStep(tokens=list(tokens))))

    def _abandon(self) -> None:
        self._requests.put(_CLOSE)
        self._replies = None

    def close(self) -> None:
        if self._replies is None:
            return
        self._requests.put(pb.DecodeRequest(close=pb.DecodeClose()))
        self._requests.put(_CLOSE)
        try:
            for _ in self._replies:  # drain: the server ends the stream after close
                pass
        except grpc.RpcError as e:
            log.debug("decode stream closed with %s", e)
        self._replies = None


class CoordinatorBackbone:
    """The pema Backbone protocol served by a remote coordinator."""

    def __init__(self, client: CoordinatorClient, cache_root: Path | None = None) -> None:
        self.client = client
        self.cache_root = cache_root or cache_dir()
        self.info = client.model_info()
        self._head: LMHead | None = None

    def head(self) -> LMHead:
        if self._head is None:
            path = self.cache_root / "heads" / f"{self.info.revision}.safetensors"
            spec = None
            if path.is_file():
                try:
                    spec = load_head(path)
                except ModelError:
                    path.unlink(missing_ok=True)  # corrupt: download again, never use it
            if spec is None:
                spec, revision = serde.head_from_chunks(self.client.head_chunks())
                if revision != self.info.revision:
                    raise ModelError(
                        f"the coordinator's head is revision {revision}, its model "
                        f"{self.info.revision}: it changed models mid-run"
                    )
                save_head(spec, path)
            self._head = LMHead(spec)
        return self._head

    def tokenizer(self) -> PreTrainedTokenizerBase:
        root = self.cache_root / "tokenizers"
        folder = root / self.info.revision
        if not folder.is_dir():
            revision, files = self.client.tokenizer_files()
            if revision != self.info.revision:
                raise ModelError("the coordinator's tokenizer and model revisions differ")
            folder = _cached_dir(root, self.info.revision, files)
        return AutoTokenizer.from_pretrained(folder)

    def _requests(self, items: Sequence[EncodeItem]) -> Iterator[list[int]]:
        """Item indices grouped into requests under the per-request token and item caps."""
        group: list[int] = []
        tokens = 0
        for i, it in enumerate(items):
            n = len(it.prompt) + len(it.target)
            if group and (
                tokens + n > self.client.config.max_request_tokens
                or len(group) >= self.client.config.max_request_items
            ):
                yield group
                group, tokens = [], 0
            group.append(i)
            tokens += n
        if group:
            yield group

    def encode(
        self,
        items: Sequence[EncodeItem],
        mode: MemoryMode,
        progress: Callable[[int], None] | None = None,
    ) -> list[Encoded]:
        results: list[Encoded | None] = [None] * len(items)

        def encode_missing(group: list[int]) -> None:
            """One Encode call for the group's items without a result yet: after a stream
            broke midway, only the rest is asked again (encoding is deterministic)."""
            todo = [i for i in group if results[i] is None]
            for r in self.client.encode_request([items[i] for i in todo], mode):
                if not 0 <= r.index < len(todo):
                    raise DataError(f"encode result for unknown item {r.index}")
                i = todo[r.index]
                keys = serde.tensor_from_proto(r.keys).float()
                if keys.shape != (len(items[i].target), self.info.hidden_size):
                    raise DataError(f"encode result {i} has keys of shape {tuple(keys.shape)}")
                generated = list(r.generated) if mode == MemoryMode.FREE_RUNNING else None
                results[i] = Encoded(keys=keys, generated=generated)
                if progress is not None:
                    progress(1)

        for group in self._requests(items):
            self.client.retrying("Encode")(encode_missing, group)
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise DataError(f"the coordinator returned no keys for {len(missing)} items")
        return [r for r in results if r is not None]

    def session(self) -> RemoteSession:
        return RemoteSession(self.client)
