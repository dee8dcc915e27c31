"""The coordinator against a real gRPC server on a free port, with a tiny random Llama.

The server runs in this process (grpc.server on a real socket, real clients over TCP); one test
starts `pema-coordinator serve` as a subprocess to check SIGTERM handling.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tiny_model import save_tiny_model
from transformers import AutoTokenizer, LlamaForCausalLM

from coordinator.config import CoordinatorConfig, Tenant, TenantLimits, hash_token
from coordinator.server import CoordinatorServer, load_model
from pema.adapter import AdapterConfig
from pema.backbone import EncodeItem, MemoryMode
from pema.data import Pair
from pema.models import default_model_dir
from pema.prompts import PromptFormat
from pema.training import TrainConfig
from proto.gen.pemaservice.v1 import coordinator_pb2 as pb
from proto.gen.pemaservice.v1 import coordinator_pb2_grpc as pb_grpc
from tenant.backend import Backend, coordinator_backend
from tenant.coordinator_client import (
    ClientConfig,
    CoordinatorBackbone,
    CoordinatorClient,
    CoordinatorError,
)
from tenant.jobs import evaluate_job, train_job

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
TENANTS = ["alpha", "beta", "small"] + [f"t{i}" for i in range(8)]
TOKENS = {t: f"token-of-{t}" for t in TENANTS}
SMALL = TenantLimits(
    max_concurrent_calls=2, max_tokens_in_flight=300, max_sequence_length=64, max_decode_sessions=1
)
C = grpc.StatusCode


class Env:
    def __init__(self, root: Path, tokenizer_dir: Path) -> None:
        self.root = root
        # Larger weights than the default init, so the model's greedy choices are not near-ties.
        self.model_dir = save_tiny_model(
            root / "tiny-llama",
            AutoTokenizer.from_pretrained(tokenizer_dir),
            max_position_embeddings=256,
            init_std=0.2,
        )
        tenants = tuple(
            Tenant(t, hash_token(TOKENS[t]), SMALL if t == "small" else TenantLimits())
            for t in TENANTS
        )
        self.config = CoordinatorConfig(
            tenants=tenants,
            model=self.model_dir,
            dtype="float32",
            host="127.0.0.1",
            port=0,
            metrics_host="127.0.0.1",
            metrics_port=0,
            max_batch_tokens=1024,
            max_queued_tokens=3000,
            max_message_bytes=64 << 10,
            grace_seconds=2.0,
            reflection=True,
        )
        lm, tokenizer = load_model(self.config)
        self.server = CoordinatorServer(self.config, lm, tokenizer)
        self.server.start()
        self.address = f"127.0.0.1:{self.server.port}"
        self.local, self.tokenizer = load_model(self.config)  # an independent in-process copy
        self.fmt = PromptFormat(self.tokenizer)
        self.clients: list[CoordinatorClient] = []

    def client(self, tenant: str, token: str | None = None, **options: Any) -> CoordinatorClient:
        c = CoordinatorClient(ClientConfig(self.address, token or TOKENS[tenant], **options))
        self.clients.append(c)
        return c

    def backbone(self, tenant: str, **options: Any) -> CoordinatorBackbone:
        return CoordinatorBackbone(self.client(tenant, **options), self.root / "cache")

    def stub(self) -> pb_grpc.CoordinatorStub:
        return pb_grpc.CoordinatorStub(self.client("alpha").channel)

    def items(self, n: int, offset: int = 0) -> list[EncodeItem]:
        words = [
            "In",
            "the",
            "beginning",
            "God",
            "created",
            "the",
            "heaven",
            "and",
            "the",
            "earth",
            "and",
            "darkness",
            "was",
            "upon",
            "the",
            "deep",
        ]
        out = []
        for i in range(offset, offset + n):
            src = " ".join(words[i % 7 : i % 7 + 3 + i % 5])
            tgt = " ".join(words[(i + 3) % 9 : (i + 3) % 9 + 2 + i % 4])
            out.append(EncodeItem(self.fmt.prompt_ids(src)[-20:], self.fmt.target_ids(tgt)))
        return out


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("coordinator")
    tokenizer_dir = default_model_dir()  # before the cache moves: the converted model lives there
    old = os.environ.get("PEMA_CACHE_DIR")
    # Downloads by coordinator_backend (head, tokenizer) go to a fresh cache.
    os.environ["PEMA_CACHE_DIR"] = str(root / "cache")
    e = Env(root, tokenizer_dir)
    yield e
    for c in e.clients:
        c.close()
    e.server.stop(grace=1.0)
    if old is None:
        os.environ.pop("PEMA_CACHE_DIR", None)
    else:
        os.environ["PEMA_CACHE_DIR"] = old


def status_of(fn: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises((grpc.RpcError, CoordinatorError)) as info:
        r = fn()  # type: ignore[operator]
        if hasattr(r, "__next__"):
            list(r)
    e = info.value
    if isinstance(e, CoordinatorError):
        return e.code, e.details
    return e.code(), e.details()


def md(tenant: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {TOKENS[tenant]}"),)


def assert_serving(env: Env) -> None:
    """The server still answers a valid request, with correct keys."""
    item = env.items(1, 5)
    got = env.backbone("alpha").encode(item, MemoryMode.TEACHER_FORCED)
    want = env.local.encode(item, MemoryMode.TEACHER_FORCED)
    torch.testing.assert_close(got[0].keys, want[0].keys, atol=2e-2, rtol=1e-3)


# -- correctness ---------------------------------------------------------------------------------


def test_model_info_and_tokenizer(env: Env) -> None:
    bb = env.backbone("alpha")
    assert bb.info == env.local.info
    tok = bb.tokenizer()
    assert (env.root / "cache" / "tokenizers" / bb.info.revision).is_dir()
    text = "In the beginning God created the heaven"
    assert tok.encode(text) == env.tokenizer.encode(text)


@pytest.mark.parametrize("mode", [MemoryMode.TEACHER_FORCED, MemoryMode.FREE_RUNNING])
def test_encode_matches_in_process(
    env: Env, mode: MemoryMode, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = env.server.service
    parse = service._parse
    received: list[pb.EncodeItem] = []

    def recording(cls: Any, raw: bytes) -> Any:  # what the server parses off the wire
        message = parse(cls, raw)
        if isinstance(message, pb.EncodeRequest):
            received.extend(message.items)
        return message

    monkeypatch.setattr(service, "_parse", recording)
    items = env.items(12)
    got = env.backbone("alpha").encode(items, mode)
    want = env.local.encode(items, mode)
    for g, w in zip(got, want, strict=True):
        assert g.keys.shape == w.keys.shape
        torch.testing.assert_close(g.keys, w.keys, atol=2e-2, rtol=1e-3)  # fp16 on the wire
        assert g.generated == w.generated
    # The gold targets reach the owner only under teacher forcing; free-running sends lengths.
    assert [list(r.prompt) for r in received] == [list(i.prompt) for i in items]
    sent = [list(r.target) for r in received]
    if mode == MemoryMode.TEACHER_FORCED:
        assert sent == [list(i.target) for i in items]
    else:
        assert sent == [[0] * len(i.target) for i in items]
        assert all(any(i.target) for i in items)  # so the zeros are not the real labels


def test_decode_matches_in_process_forward(env: Env) -> None:
    prompts = [i.prompt for i in env.items(3)]
    steps = [[11, 12, 13], [400, 500, 600]]
    for dtype, atol in (("float32", 1e-5), ("float16", 2e-2)):
        remote = env.backbone("alpha", decode_dtype=dtype).session()
        local = env.local.session()
        torch.testing.assert_close(
            remote.start(prompts), local.start(prompts), atol=atol, rtol=1e-3
        )
        for tokens in steps:
            torch.testing.assert_close(
                remote.step(tokens), local.step(tokens), atol=atol, rtol=1e-3
            )
        remote.close()
        local.close()
    # And against a plain forward of the unmodified model on the full sequence.
    model = LlamaForCausalLM.from_pretrained(env.model_dir, dtype=torch.float32).eval()
    session = env.backbone("alpha", decode_dtype="float32").session()
    h = session.start([prompts[0]])
    h = session.step([42])
    session.close()
    with torch.no_grad():
        out = model(torch.tensor([[*prompts[0], 42]]), output_hidden_states=True)
    head = env.backbone("alpha").head()
    torch.testing.assert_close(head(h), out.logits[:, -1], atol=1e-4, rtol=1e-4)


def test_downloaded_head_reproduces_logits(env: Env) -> None:
    bb = env.backbone("alpha")
    head = bb.head()
    assert (env.root / "cache" / "heads" / f"{bb.info.revision}.safetensors").is_file()
    model = LlamaForCausalLM.from_pretrained(env.model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([env.items(1)[0].prompt])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    # hidden_states[-1] is after the final norm; the pre-norm state comes from the frozen copy.
    pre, _, _ = env.local.forward_padded([ids[0].tolist()])
    torch.testing.assert_close(head(pre[0]), out.logits[0], atol=1e-4, rtol=1e-4)
    # Chunks are small: the head never travels as one message.
    chunks = list(env.client("alpha").head_chunks())
    assert len(chunks) > 2 and all(c.ByteSize() <= (1 << 20) + 1024 for c in chunks)
    # A second backbone reads the cached head instead of downloading it.
    assert torch.equal(env.backbone("alpha").head().spec.weight, head.spec.weight)


def test_adapter_trained_through_coordinator_matches_in_process(env: Env) -> None:
    words = [
        "the",
        "lord",
        "said",
        "unto",
        "moses",
        "go",
        "down",
        "and",
        "speak",
        "unto",
        "the",
        "people",
        "of",
        "israel",
    ]
    pairs = [
        Pair(" ".join(words[i % 6 : i % 6 + 4]), " ".join(words[(i + 2) % 7 : (i + 2) % 7 + 3]))
        for i in range(24)
    ]
    remote = coordinator_backend(env.address, TOKENS["beta"], decode_dtype="float32")
    local = Backend(env.local, env.tokenizer)
    ac = AdapterConfig(
        hidden_size=1,
        rank=8,
        variant="residual",
        key_norm="rms",
        kappa=0.0,
        lambda_max=0.5,
        schedule="constant",
        template="Rewrite: {source}",
    )
    tc = TrainConfig(batch_size=64, epochs=2, rct_epochs=0, eval_every=10, seed=0)
    results = []
    for backend in (remote, local):
        outcome = train_job(backend, pairs[:20], pairs[20:], ac, tc, None, None, quiet=True)
        results.append(
            (
                outcome,
                evaluate_job(
                    backend, outcome.adapter, pairs[20:], include_untuned=False, quiet=True
                ),
            )
        )
    (ro, re), (lo, le) = results
    torch.testing.assert_close(
        ro.train_memory.memory.keys.float(),
        lo.train_memory.memory.keys.float(),
        atol=2e-2,
        rtol=1e-3,
    )
    assert torch.equal(ro.train_memory.memory.targets, lo.train_memory.memory.targets)
    assert re["outputs"] == le["outputs"]
    assert (re["bleu"], re["chrf"]) == (le["bleu"], le["chrf"])


def test_eight_concurrent_tenants(env: Env) -> None:
    want = {i: env.local.encode(env.items(6, 10 * i), MemoryMode.TEACHER_FORCED) for i in range(8)}
    got: dict[int, list] = {}
    errors: list[BaseException] = []
    backbones = {i: env.backbone(f"t{i}") for i in range(8)}
    before = sample(env, "pema_coordinator_batch_tenants_bucket", le="1.0")

    def run(i: int) -> None:
        try:
            got[i] = backbones[i].encode(env.items(6, 10 * i), MemoryMode.TEACHER_FORCED)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    # Hold the model until every tenant's request is queued, so passes must merge tenants.
    with env.server.worker.hold():
        for t in threads:
            t.start()
        deadline = time.time() + 10
        total = sum(
            len(it.prompt) + len(it.target) for i in range(8) for it in env.items(6, 10 * i)
        )
        while env.server.worker.queued_tokens < total and time.time() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(30)
    assert not errors, errors
    for i in range(8):
        for g, w in zip(got[i], want[i], strict=True):
            torch.testing.assert_close(g.keys, w.keys, atol=2e-2, rtol=1e-3)
    after_single = sample(env, "pema_coordinator_batch_tenants_bucket", le="1.0")
    after_all = sample(env, "pema_coordinator_batch_tenants_count")
    assert after_all > after_single  # some forward pass held items of several tenants
    assert before <= after_single


# -- auth ----------------------------------------------------------------------------------------


def test_auth(env: Env) -> None:
    stub = env.stub()
    req = pb.GetModelInfoRequest()
    assert status_of(lambda: stub.GetModelInfo(req, timeout=5))[0] == C.UNAUTHENTICATED
    bad = (("authorization", "Bearer not-a-token"),)
    assert (
        status_of(lambda: stub.GetModelInfo(req, metadata=bad, timeout=5))[0] == C.UNAUTHENTICATED
    )
    basic = (("authorization", f"Basic {TOKENS['alpha']}"),)
    assert (
        status_of(lambda: stub.GetModelInfo(req, metadata=basic, timeout=5))[0] == C.UNAUTHENTICATED
    )
    assert status_of(lambda: stub.GetHead(pb.GetHeadRequest(), timeout=5))[0] == C.UNAUTHENTICATED
    # Another tenant's decode session: alpha detaches (half-close without close), beta resumes.
    prompt = env.items(1)[0].prompt
    replies = stub.Decode(
        iter([pb.DecodeRequest(start=pb.DecodeStart(prompts=[pb.Prompt(ids=prompt)]))]),
        metadata=md("alpha"),
        timeout=10,
    )
    first, *_ = list(replies)  # drain: the stream ends, the session detaches
    resume = pb.DecodeRequest(resume=pb.DecodeResume(session_id=first.session_id))
    code, msg = status_of(lambda: stub.Decode(iter([resume]), metadata=md("beta"), timeout=10))
    assert code == C.PERMISSION_DENIED and "another tenant" in msg
    unknown = pb.DecodeRequest(resume=pb.DecodeResume(session_id="nope"))
    assert (
        status_of(lambda: stub.Decode(iter([unknown]), metadata=md("alpha"), timeout=10))[0]
        == C.NOT_FOUND
    )
    # Its owner resumes it, gets the same state back, and closes it.
    close = pb.DecodeRequest(close=pb.DecodeClose())
    again = list(stub.Decode(iter([resume, close]), metadata=md("alpha"), timeout=10))
    assert again[0].hidden == first.hidden
    assert_serving(env)


# -- limits and bad input ------------------------------------------------------------------------


def test_tenant_limits(env: Env) -> None:
    small = env.backbone("small")
    long_item = EncodeItem(list(range(100, 150)), list(range(200, 230)))  # 80 > 64 tokens
    code, msg = status_of(lambda: small.encode([long_item], MemoryMode.TEACHER_FORCED))
    assert code == C.RESOURCE_EXHAUSTED and "max_sequence_length" in msg
    many = [EncodeItem(list(range(100, 130)), list(range(200, 220)))] * 8  # 400 > 300 tokens
    small.client.config = ClientConfig(env.address, TOKENS["small"], max_request_tokens=10_000)
    code, msg = status_of(lambda: small.encode(many, MemoryMode.TEACHER_FORCED))
    assert code == C.RESOURCE_EXHAUSTED and "max_tokens_in_flight" in msg
    # Decode sessions (1) and concurrent calls (2): hold one session, open a second stream.
    s1 = small.session()
    s1.start([[1, 2, 3]])
    stub = env.stub()
    gate = threading.Event()

    def waiting() -> Iterator[pb.DecodeRequest]:
        gate.wait(10)
        yield pb.DecodeRequest(start=pb.DecodeStart(prompts=[pb.Prompt(ids=[1, 2])]))

    second = stub.Decode(waiting(), metadata=md("small"), timeout=10)
    deadline = time.time() + 5
    while env.server.service._state["small"].calls < 2 and time.time() < deadline:
        time.sleep(0.01)
    code, msg = status_of(
        lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=md("small"), timeout=5)
    )
    assert code == C.RESOURCE_EXHAUSTED and "max_concurrent_calls" in msg
    gate.set()
    code, msg = status_of(lambda: second)
    assert code == C.RESOURCE_EXHAUSTED and "max_decode_sessions" in msg
    s1.close()
    # Limits are released: the small tenant is served again.
    assert small.encode([EncodeItem([1, 2, 3], [4, 5])], MemoryMode.TEACHER_FORCED)[
        0
    ].keys.shape == (2, 32)
    assert_serving(env)


def test_overload_is_unavailable_and_retried(env: Env) -> None:
    big = env.items(70)  # the test server queues at most 3000 tokens
    assert 1500 < sum(len(i.prompt) + len(i.target) for i in big) <= 3000
    alpha = env.backbone("alpha")
    beta_once = env.backbone("beta", retry_seconds=0)
    beta_retry = env.backbone("beta", retry_seconds=30, backoff=0.1)
    done: list[object] = []
    with env.server.worker.hold():
        t = threading.Thread(
            target=lambda: done.append(alpha.encode(big, MemoryMode.TEACHER_FORCED))
        )
        t.start()
        deadline = time.time() + 5
        while env.server.worker.queued_tokens == 0 and time.time() < deadline:
            time.sleep(0.01)
        code, msg = status_of(lambda: beta_once.encode(big, MemoryMode.TEACHER_FORCED))
        assert code == C.UNAVAILABLE and "overloaded" in msg
        # The retrying client gets through once the queue drains.
        r = threading.Thread(
            target=lambda: done.append(beta_retry.encode(big, MemoryMode.TEACHER_FORCED))
        )
        r.start()
        time.sleep(0.3)
    t.join(30)
    r.join(30)
    assert len(done) == 2
    assert_serving(env)


def test_bad_input(env: Env) -> None:
    stub = env.stub()
    V = env.local.info.vocab_size

    def encode(mode: Any, items: list[pb.EncodeItem]) -> tuple[grpc.StatusCode, str]:
        req = pb.EncodeRequest(mode=mode, items=items)
        return status_of(lambda: stub.Encode(req, metadata=md("alpha"), timeout=10))

    TF = pb.MEMORY_MODE_TEACHER_FORCED
    cases = {
        "outside the vocabulary": encode(TF, [pb.EncodeItem(prompt=[1, V + 5], target=[2])]),
        "outside the vocabulary ": encode(TF, [pb.EncodeItem(prompt=[1, -3], target=[2])]),
        "prompt is empty": encode(TF, [pb.EncodeItem(prompt=[], target=[2])]),
        "target is empty": encode(TF, [pb.EncodeItem(prompt=[1], target=[])]),
        "no items": encode(TF, []),
        "mode must be": encode(pb.MEMORY_MODE_UNSPECIFIED, [pb.EncodeItem(prompt=[1], target=[2])]),
        "mode must be ": encode(7, [pb.EncodeItem(prompt=[1], target=[2])]),
        "model's limit": encode(TF, [pb.EncodeItem(prompt=[5] * 250, target=[6] * 10)]),
        "exceeds the limit": encode(TF, [pb.EncodeItem(prompt=[40000] * 20, target=[2])] * 1200),
    }
    for expected, (code, msg) in cases.items():
        assert code == C.INVALID_ARGUMENT, (expected, code, msg)
        assert expected.strip() in msg, (expected, msg)
        assert "Traceback" not in msg

    def decode(*msgs: pb.DecodeRequest) -> tuple[grpc.StatusCode, str]:
        return status_of(lambda: stub.Decode(iter(msgs), metadata=md("alpha"), timeout=10))

    start = pb.DecodeRequest(
        start=pb.DecodeStart(prompts=[pb.Prompt(ids=[1, 2]), pb.Prompt(ids=[3])])
    )
    dcases = {
        "must be start or resume": decode(pb.DecodeRequest(step=pb.DecodeStep(tokens=[1]))),
        "expected 2 tokens": decode(start, pb.DecodeRequest(step=pb.DecodeStep(tokens=[1]))),
        "outside the vocabulary": decode(
            start, pb.DecodeRequest(step=pb.DecodeStep(tokens=[1, V]))
        ),
        "hidden_dtype": decode(
            pb.DecodeRequest(
                start=pb.DecodeStart(prompts=[pb.Prompt(ids=[1])], hidden_dtype="int8")
            )
        ),
        "no prompts": decode(pb.DecodeRequest(start=pb.DecodeStart())),
        "empty decode message": decode(pb.DecodeRequest()),
        "already has a session": decode(start, start),
    }
    for expected, (code, msg) in dcases.items():
        assert code == C.INVALID_ARGUMENT, (expected, code, msg)
        assert expected in msg, (expected, msg)
    for chunk_bytes in (-1, 1, (64 << 10) - 1):
        code, msg = status_of(
            lambda n=chunk_bytes: stub.GetHead(  # type: ignore[misc]
                pb.GetHeadRequest(chunk_bytes=n), metadata=md("alpha"), timeout=5
            )
        )
        assert code == C.INVALID_ARGUMENT and "at least 65536" in msg, (chunk_bytes, msg)
    chunks = list(
        stub.GetHead(pb.GetHeadRequest(chunk_bytes=64 << 10), metadata=md("alpha"), timeout=60)
    )
    assert len(chunks) > 2 and all(c.ByteSize() <= (64 << 10) + 1024 for c in chunks)
    assert_serving(env)


def test_health_and_reflection(env: Env) -> None:
    channel = env.client("alpha").channel
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "pemaservice.v1.Coordinator"):
        r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(
        refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
    )
    names = {s.name for s in replies[0].list_services_response.service}
    assert "pemaservice.v1.Coordinator" in names and "grpc.health.v1.Health" in names


# -- metrics -------------------------------------------------------------------------------------


def scrape(env: Env) -> dict[str, list]:
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{env.server.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    families: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            families.setdefault(s.name, []).append(s)
    return families


def sample(env: Env, name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in scrape(env).get(name, [])
        if all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_metrics(env: Env) -> None:
    for tenant in ("alpha", "beta"):
        env.backbone(tenant).encode(env.items(2), MemoryMode.TEACHER_FORCED)
    stub = env.stub()
    status_of(
        lambda: stub.GetModelInfo(
            pb.GetModelInfoRequest(), metadata=(("authorization", "Bearer nope"),), timeout=5
        )
    )
    m = scrape(env)
    for tenant in ("alpha", "beta"):
        ok = [
            s
            for s in m["pema_coordinator_requests_total"]
            if s.labels == {"tenant": tenant, "method": "Encode", "code": "OK"}
        ]
        assert ok and ok[0].value >= 1
        counts = [
            s
            for s in m["pema_coordinator_request_seconds_count"]
            if s.labels == {"tenant": tenant, "method": "Encode"}
        ]
        assert counts and counts[0].value >= 1
        assert any(
            s.labels.get("tenant") == tenant for s in m["pema_coordinator_request_seconds_bucket"]
        )
        keys = [
            s
            for s in m["pema_coordinator_tokens_total"]
            if s.labels == {"tenant": tenant, "kind": "keys"}
        ]
        assert keys and keys[0].value > 0
    tenants_seen = {s.labels["tenant"] for s in m["pema_coordinator_requests_total"]}
    assert tenants_seen <= set(TENANTS) | {"_unauthenticated"}
    assert "_unauthenticated" in tenants_seen
    assert m["pema_coordinator_batch_tokens_count"][0].value > 0
    assert any(s.value > 0 for s in m["pema_coordinator_queue_seconds_count"])
    assert {s.labels["tenant"] for s in m["pema_coordinator_active_sessions"]} == set(TENANTS)


# -- the CLI: serve, health, SIGTERM -------------------------------------------------------------


def start_cli(
    env: Env, tmp_path: Path, grace: float, *tenants: str
) -> tuple[subprocess.Popen[str], int]:
    """`pema-coordinator serve` as a subprocess on a free port, serving `tenants`; its log goes
    to tmp_path / "coordinator.log"."""
    path = tmp_path / "tenants.json"
    path.write_text(
        json.dumps({"tenants": [{"id": t, "token_sha256": hash_token(TOKENS[t])} for t in tenants]})
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coordinator.cli",
            "serve",
            "--model",
            str(env.model_dir),
            "--dtype",
            "float32",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--tenants",
            str(path),
            "--grace-seconds",
            str(grace),
            "--log-level",
            "INFO",
        ],
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "coordinator.log").open("w"),
        text=True,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if "listening on port" not in line:
        proc.kill()
        raise AssertionError((line, (tmp_path / "coordinator.log").read_text()))
    return proc, int(line.split("port ")[1].split(",")[0])


def test_serve_cli_and_sigterm(env: Env, tmp_path: Path) -> None:
    proc, port = start_cli(env, tmp_path, 20, "alpha")
    try:
        client = CoordinatorClient(
            ClientConfig(f"127.0.0.1:{port}", TOKENS["alpha"], decode_dtype="float32")
        )
        health = health_pb2_grpc.HealthStub(client.channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        bb = CoordinatorBackbone(client, tmp_path / "cache")
        session = bb.session()
        h0 = session.start([[1, 2, 3]])
        proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # a watch is an in-flight call too: it would hold the drain to its grace
        # The in-flight session is still served during the grace period...
        h1 = session.step([4])
        local = env.local.session()
        local.start([[1, 2, 3]])
        torch.testing.assert_close(h1, local.step([4]), atol=1e-5, rtol=1e-4)
        assert h0.shape == (1, 32)
        # ...new calls are not, and once it closes the server exits cleanly.
        session.close()
        assert proc.wait(timeout=20) == 0
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_tenant_cli_through_coordinator(
    env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pema-tenant train|generate --coordinator ... ` with the token from PEMA_TOKEN."""
    from tenant.cli import main as tenant_main

    words = ["in", "the", "beginning", "god", "created", "the", "heaven", "and", "the", "earth"]
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text(
        "source\ttarget\n"
        + "".join(
            f"{' '.join(words[i : i + 3])}\t{' '.join(words[i + 1 : i + 4])}\n" for i in range(6)
        )
    )
    out = tmp_path / "adapter"
    os.environ["PEMA_TOKEN"] = TOKENS["beta"]
    try:
        common = ["--coordinator", env.address]
        train = ["train", "--train", str(tsv), "--valid", str(tsv), "--out", str(out)]
        opts = ["--rank", "4", "--epochs", "1", "--no-cache", "--quiet", *common]
        assert tenant_main([*train, *opts]) == 0
        assert (out / "config.json").is_file() or any(out.iterdir())
        assert tenant_main(["generate", "--adapter", str(out), *common, "the earth"]) == 0
    finally:
        os.environ.pop("PEMA_TOKEN", None)
    assert tenant_main(["generate", "--adapter", str(out), "--coordinator", env.address, "x"]) == 2
    assert "needs --token" in capsys.readouterr().err


# -- hostile or careless tenants -----------------------------------------------------------------

METHOD = "/pemaservice.v1.Coordinator/"
# How each method is called; the stubs built from these carry raw bytes both ways.
KINDS = {
    "GetModelInfo": "unary_unary",
    "GetTokenizer": "unary_unary",
    "GetHead": "unary_stream",
    "Encode": "unary_stream",
    "Decode": "stream_stream",
}
GARBAGE = b"\xff" * 16  # an over-long varint: no protobuf message parses from it


def raw_call(
    channel: grpc.Channel,
    method: str,
    payloads: list[bytes],
    metadata: tuple[tuple[str, str], ...] = (),
    timeout: float = 10,
) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """Send request bytes as they are; (status code, details, reply bytes)."""
    kind = KINDS[method]
    fn = getattr(channel, kind)(METHOD + method)
    replies: list[bytes] = []
    try:
        if kind == "stream_stream":
            replies.extend(fn(iter(payloads), metadata=metadata, timeout=timeout))
        elif kind == "unary_stream":
            replies.extend(fn(payloads[0], metadata=metadata, timeout=timeout))
        else:
            replies.append(fn(payloads[0], metadata=metadata, timeout=timeout))
    except grpc.RpcError as e:
        return e.code(), e.details() or "", replies
    return C.OK, "", replies


def requests_total(env: Env, **labels: str) -> float:
    return sample(env, "pema_coordinator_requests_total", **labels)


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_undecodable_requests_are_invalid_argument(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    channel = env.client("alpha").channel
    internal = requests_total(env, code="INTERNAL")
    start = pb.DecodeRequest(start=pb.DecodeStart(prompts=[pb.Prompt(ids=[1, 2])]))
    for method in KINDS:
        code, msg, _ = raw_call(channel, method, [GARBAGE], md("alpha"))
        assert code == C.INVALID_ARGUMENT and "undecodable" in msg, (method, code, msg)
        # Without credentials the caller learns nothing else: authentication comes first.
        code, msg, _ = raw_call(channel, method, [GARBAGE])
        assert code == C.UNAUTHENTICATED, (method, code, msg)
    # Garbage after a valid start: the session is set up, then the stream fails cleanly.
    code, msg, replies = raw_call(
        channel, "Decode", [start.SerializeToString(), GARBAGE], md("alpha")
    )
    assert code == C.INVALID_ARGUMENT and len(replies) == 1
    assert requests_total(env, code="INTERNAL") == internal
    assert requests_total(env, tenant="alpha", method="Decode", code="INVALID_ARGUMENT") >= 2
    assert not errors_logged(caplog)
    assert_serving(env)


def test_sigterm_after_undecodable_decode_messages_exits_in_time(env: Env, tmp_path: Path) -> None:
    """The campaign's scenario: 40 authenticated Decode streams of one undecodable message each,
    then SIGTERM, with one more stream still open: the process is gone within grace + 5 s."""
    grace = 3.0
    proc, port = start_cli(env, tmp_path, grace, "alpha")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    gate = threading.Event()
    try:
        decode = channel.stream_stream(METHOD + "Decode")
        calls = [decode(iter([b"\xff" * 8]), metadata=md("alpha"), timeout=30) for _ in range(40)]
        codes = []
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            codes.append(info.value.code())
        # Every call the tenant's limit admits reads the message and refuses it; past the limit
        # (8 in flight at once, how many overlap depends on the machine's load) a call is refused
        # before it is read. Either way a clean status, never INTERNAL.
        assert set(codes) <= {C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED}, codes
        assert codes.count(C.INVALID_ARGUMENT) >= TenantLimits().max_concurrent_calls, codes

        def held() -> Iterator[bytes]:
            yield pb.DecodeRequest(
                start=pb.DecodeStart(prompts=[pb.Prompt(ids=[1, 2, 3])])
            ).SerializeToString()
            gate.wait(60)

        open_stream = decode(held(), metadata=md("alpha"), timeout=60)
        next(open_stream)  # a session is running when the signal comes
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=grace + 5)
        assert time.monotonic() - t0 <= grace + 5
        assert rc == 0
        log = (tmp_path / "coordinator.log").read_text()
        assert "cancelling 1 calls (alpha Decode x1)" in log, log
        assert "Traceback" not in log and "Exception deserializing" not in log, log
    finally:
        gate.set()
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cancel_and_deadline_are_counted_as_such(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    stub = env.stub()
    keys = [
        (m, c)
        for m in ("Decode", "Encode", "GetHead")
        for c in ("CANCELLED", "DEADLINE_EXCEEDED", "INTERNAL")
    ]
    before = {k: requests_total(env, tenant="alpha", method=k[0], code=k[1]) for k in keys}
    gate = threading.Event()
    start = pb.DecodeRequest(start=pb.DecodeStart(prompts=[pb.Prompt(ids=[1, 2, 3])]))

    def held() -> Iterator[pb.DecodeRequest]:
        yield start
        gate.wait(30)

    try:
        cancelled = stub.Decode(held(), metadata=md("alpha"), timeout=30)
        next(cancelled)
        cancelled.cancel()
        late = stub.Decode(held(), metadata=md("alpha"), timeout=2)
        next(late)
        with pytest.raises(grpc.RpcError) as info:
            list(late)
        assert info.value.code() == C.DEADLINE_EXCEEDED
        with env.server.worker.hold():
            item = pb.EncodeItem(prompt=[1, 2], target=[3])
            request = pb.EncodeRequest(mode=pb.MEMORY_MODE_TEACHER_FORCED, items=[item])
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Encode(request, metadata=md("alpha"), timeout=0.5))
            assert info.value.code() == C.DEADLINE_EXCEEDED
            time.sleep(1.0)  # the handler notices within its poll interval
        head = stub.GetHead(pb.GetHeadRequest(chunk_bytes=64 << 10), metadata=md("alpha"))
        next(head)
        head.cancel()
    finally:
        gate.set()
    want = {
        ("Decode", "CANCELLED"): 1,
        ("Decode", "DEADLINE_EXCEEDED"): 1,
        ("Encode", "DEADLINE_EXCEEDED"): 1,
        ("GetHead", "CANCELLED"): 1,
    }
    deadline = time.time() + 10
    while True:
        got = {
            k: requests_total(env, tenant="alpha", method=k[0], code=k[1]) - before[k] for k in keys
        }
        if all(got[k] >= n for k, n in want.items()) or time.time() > deadline:
            break
        time.sleep(0.2)
    assert all(got[k] >= n for k, n in want.items()), sorted(got.items())
    assert all(got[(m, "INTERNAL")] == 0 for m in ("Decode", "Encode", "GetHead")), got
    assert not errors_logged(caplog)
    assert_serving(env)


def test_long_caller_strings_are_not_echoed(env: Env) -> None:
    stub = env.stub()

    def decode(msg: pb.DecodeRequest) -> tuple[grpc.StatusCode, str]:
        return status_of(lambda: stub.Decode(iter([msg]), metadata=md("alpha"), timeout=10))

    code, msg = decode(pb.DecodeRequest(resume=pb.DecodeResume(session_id="x" * 20000)))
    assert code == C.NOT_FOUND and len(msg) < 200, (code, msg[:300])
    code, msg = decode(
        pb.DecodeRequest(
            start=pb.DecodeStart(prompts=[pb.Prompt(ids=[1])], hidden_dtype="y" * 20000)
        )
    )
    assert code == C.INVALID_ARGUMENT and "hidden_dtype" in msg and len(msg) < 200


def test_tenants_within_limits_cannot_lock_out_another(env: Env) -> None:
    """Four tenants each try to hold 7 idle Decode streams (their limit is 8): some are refused
    UNAVAILABLE, but a fifth tenant's call and each tenant's reserved calls still get through."""
    stub = env.stub()
    gate = threading.Event()

    def idle() -> Iterator[pb.DecodeRequest]:
        gate.wait(30)
        return
        yield

    service = env.server.service
    calls = {
        t: [stub.Decode(idle(), metadata=md(t), timeout=30) for _ in range(7)] for t in TENANTS[3:7]
    }
    try:
        deadline = time.time() + 10
        while time.time() < deadline:
            held = service._active_calls
            time.sleep(0.5)
            if service._active_calls == held and held >= 8:
                break
        r = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=md("beta"), timeout=5)
        assert r.hidden_size == 32
        for t in TENANTS[3:7]:
            assert service._state[t].calls >= env.config.reserved_calls
    finally:
        gate.set()
    codes: list[grpc.StatusCode] = []
    for cs in calls.values():
        for c in cs:
            try:
                list(c)
                codes.append(C.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
    assert set(codes) <= {C.OK, C.UNAVAILABLE} and C.OK in codes and C.UNAVAILABLE in codes
    assert_serving(env)


def test_unauthenticated_streams_cannot_starve_tenants(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 idle reflection streams without credentials: tenants and health checks are served,
    and the server ends reflection streams by itself."""
    from grpc_reflection.v1alpha import reflection_pb2_grpc

    import coordinator.server

    monkeypatch.setattr(coordinator.server, "REFLECTION_STREAM_SECONDS", 2.0)
    assert CoordinatorConfig(tenants=env.config.tenants).reflection is False  # off by default
    channel = grpc.insecure_channel(env.address)
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    gate = threading.Event()

    def idle() -> Iterator[Any]:
        gate.wait(30)
        return
        yield

    streams = [refl.ServerReflectionInfo(idle(), timeout=30) for _ in range(40)]
    try:
        time.sleep(0.5)
        r = env.stub().GetModelInfo(pb.GetModelInfoRequest(), metadata=md("beta"), timeout=5)
        assert r.hidden_size == 32
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            list(streams[0])
        assert info.value.code() == C.CANCELLED and time.monotonic() - t0 < 5
    finally:
        gate.set()
        for s in streams:
            s.cancel()
        channel.close()


def test_decode_steps_count_against_the_token_budget(env: Env) -> None:
    """The small tenant may hold 300 tokens: a 5 x 50 session takes 250, ten steps 50 more."""
    stub = env.stub()
    start = pb.DecodeRequest(start=pb.DecodeStart(prompts=[pb.Prompt(ids=[7] * 50)] * 5))
    step = pb.DecodeRequest(step=pb.DecodeStep(tokens=[8] * 5))
    replies = []
    with pytest.raises(grpc.RpcError) as info:
        for reply in stub.Decode(iter([start] + [step] * 11), metadata=md("small"), timeout=20):
            replies.append(reply)
    assert info.value.code() == C.RESOURCE_EXHAUSTED
    assert "max_tokens_in_flight" in (info.value.details() or "")
    assert len(replies) == 11 and replies[-1].length == 60
    state = env.server.service._state["small"]
    assert state.tokens == 300  # the detached session still holds its KV cache
    resume = pb.DecodeRequest(resume=pb.DecodeResume(session_id=replies[0].session_id))
    close = pb.DecodeRequest(close=pb.DecodeClose())
    list(stub.Decode(iter([resume, close]), metadata=md("small"), timeout=10))
    assert state.tokens == 0


def test_dropped_session_is_replaced_by_a_new_one(env: Env) -> None:
    """The small tenant may hold one session; its dropped stream does not lock it out."""
    stub = env.stub()
    start = pb.DecodeRequest(start=pb.DecodeStart(prompts=[pb.Prompt(ids=[1, 2, 3])]))
    close = pb.DecodeRequest(close=pb.DecodeClose())
    first = list(stub.Decode(iter([start]), metadata=md("small"), timeout=10))  # no close
    second = list(stub.Decode(iter([start, close]), metadata=md("small"), timeout=10))
    assert second[0].session_id != first[0].session_id
    resume = pb.DecodeRequest(resume=pb.DecodeResume(session_id=first[0].session_id))
    code, _ = status_of(lambda: stub.Decode(iter([resume]), metadata=md("small"), timeout=10))
    assert code == C.NOT_FOUND
    assert env.server.service._state["small"].tokens == 0


def test_limit_flags(tmp_path: Path) -> None:
    from coordinator.cli import build_parser, config_from_args

    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"tenants": [{"id": "a", "token_sha256": hash_token("x")}]}))
    base = ["serve", "--tenants", str(path)]
    c = config_from_args(build_parser().parse_args(base))
    assert (c.session_idle_seconds, c.reserved_calls, c.rpc_threads, c.reflection) == (
        120.0,
        2,
        32,
        False,
    )
    flags = ["--resume-window-seconds", "5", "--reserved-calls", "3", "--rpc-threads", "40"]
    c = config_from_args(build_parser().parse_args([*base, *flags, "--reflection"]))
    assert (c.session_idle_seconds, c.reserved_calls, c.rpc_threads, c.reflection) == (
        5.0,
        3,
        40,
        True,
    )
