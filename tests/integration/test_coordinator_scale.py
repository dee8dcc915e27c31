"""The coordinator under concurrent decode, and what operators see: a real gRPC server on a free
port with a tiny random Llama (fp32), real clients over TCP, /metrics scraped over HTTP."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tiny_model import make_tiny_llama
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from coordinator.config import CoordinatorConfig, Tenant, TenantLimits, hash_token
from coordinator.server import CoordinatorServer
from pema.backbone import EncodeItem, FrozenLM, MemoryMode
from pema.generation import generate
from tenant.coordinator_client import ClientConfig, CoordinatorBackbone, CoordinatorClient

TENANTS = [f"t{i}" for i in range(4)]
SESSIONS_PER_TENANT = 2
NEW_TOKENS = 8


class Env:
    def __init__(self, root: Path, tokenizer: PreTrainedTokenizerBase) -> None:
        self.root = root
        self.tokenizer = tokenizer
        model = make_tiny_llama(tokenizer, 9, 256, init_std=0.2)
        self.lm = FrozenLM(model, "tiny", "rev-scale")
        self.local = FrozenLM(make_tiny_llama(tokenizer, 9, 256, init_std=0.2), "tiny", "rev")
        limits = TenantLimits(max_decode_sessions=SESSIONS_PER_TENANT)
        self.config = CoordinatorConfig(
            tenants=tuple(Tenant(t, hash_token(f"tok-{t}"), limits) for t in TENANTS),
            host="127.0.0.1",
            port=0,
            metrics_host="127.0.0.1",
            metrics_port=0,
            max_queued_tokens=5000,
            grace_seconds=1.0,
        )
        self.server = CoordinatorServer(self.config, self.lm, tokenizer)
        self.server.start()
        self.clients: list[CoordinatorClient] = []

    def backbone(self, tenant: str) -> CoordinatorBackbone:
        config = ClientConfig(
            f"127.0.0.1:{self.server.port}", f"tok-{tenant}", decode_dtype="float32"
        )
        client = CoordinatorClient(config)
        self.clients.append(client)
        return CoordinatorBackbone(client, self.root / "cache")

    def scrape(self) -> dict[str, list]:
        url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        families: dict[str, list] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                families.setdefault(s.name, []).append(s)
        return families


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase
) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("scale"), tokenizer)
    yield e
    for c in e.clients:
        c.close()
    e.server.stop(grace=1.0)


def test_concurrent_decode_sessions_are_batched_with_their_solo_tokens(env: Env) -> None:
    prompts = {
        (t, k): [[(7 * i + 3 * k + j) % 900 + 5 for j in range(3 + (i + k) % 6)]]
        for i, t in enumerate(TENANTS)
        for k in range(SESSIONS_PER_TENANT)
    }
    head = env.local.head()
    want = {
        key: generate(env.local.session(), head, p, frozenset(), [NEW_TOKENS])
        for key, p in prompts.items()
    }
    got: dict[tuple[str, int], list[list[int]]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompts))

    remote_head = env.backbone("t0").head()  # downloaded once, shared by the threads

    def client(key: tuple[str, int]) -> None:
        try:
            bb = env.backbone(key[0])
            barrier.wait(timeout=30)
            got[key] = generate(bb.session(), remote_head, prompts[key], frozenset(), [NEW_TOKENS])
        except BaseException as e:
            errors.append(e)

    before = env.scrape()
    threads = [threading.Thread(target=client, args=(key,)) for key in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert got == want
    after = env.scrape()

    def total(m: dict[str, list], name: str) -> float:
        return sum(s.value for s in m.get(name, []))

    passes = total(after, "pema_coordinator_decode_batch_rows_count") - total(
        before, "pema_coordinator_decode_batch_rows_count"
    )
    rows = total(after, "pema_coordinator_decode_batch_rows_sum") - total(
        before, "pema_coordinator_decode_batch_rows_sum"
    )
    assert rows == len(prompts) * (NEW_TOKENS - 1)  # every step of every session, once
    assert passes < rows  # some passes stepped several sessions together
    # The per-tenant session limit still holds while batched.
    bb = env.backbone("t0")
    sessions = [bb.session() for _ in range(SESSIONS_PER_TENANT + 1)]
    for s in sessions[:-1]:
        s.start([[5, 6]])
    with pytest.raises(Exception, match="max_decode_sessions"):
        sessions[-1].start([[5, 6]])
    for s in sessions[:-1]:
        s.close()


def test_operator_metrics(env: Env) -> None:
    bb = env.backbone("t1")
    bb.encode(
        [EncodeItem([5, 6, 7], [8, 9])],
        MemoryMode.TEACHER_FORCED,
    )
    m = env.scrape()
    # Default process and platform collectors.
    assert m["process_resident_memory_bytes"][0].value > 0
    assert m["process_cpu_seconds_total"][0].value > 0
    assert m["python_info"][0].labels["implementation"]
    # The model, and saturation against the limits.
    (info,) = m["pema_coordinator_model_info"]
    assert info.labels == {
        "name": "tiny",
        "revision": "rev-scale",
        "dtype": "float32",
        "device": "cpu",
    }
    assert m["pema_coordinator_max_queued_tokens"][0].value == 5000
    assert m["pema_coordinator_queued_tokens"][0].value == 0
    assert m["pema_coordinator_calls_in_flight"][0].value == 0
    assert m["pema_coordinator_max_calls"][0].value == env.server.service.max_calls
    occupancy = {s.labels["kind"]: s.value for s in m["pema_coordinator_batch_occupancy"]}
    assert 0 < occupancy["encode"] <= 1 and set(occupancy) == {"encode", "decode"}
    # gRPC metrics under the conventional names, streaming methods included.
    handled = {
        (s.labels["grpc_method"], s.labels["grpc_type"], s.labels["grpc_code"]): s.value
        for s in m["grpc_server_handled_total"]
    }
    assert handled[("Encode", "SERVER_STREAMING", "OK")] >= 1
    assert handled[("GetModelInfo", "UNARY", "OK")] >= 1
    assert handled[("Decode", "BIDI_STREAMING", "OK")] >= 1
    assert handled[("Decode", "BIDI_STREAMING", "RESOURCE_EXHAUSTED")] >= 1
    seconds = {s.labels["grpc_method"]: s.value for s in m["grpc_server_handling_seconds_count"]}
    assert seconds["Encode"] >= 1 and seconds["Decode"] >= 1
    assert m["grpc_server_started_total"]
