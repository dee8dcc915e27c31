"""A seeded, bounded fuzz run against a real coordinator (gRPC on a free port, a tiny Llama).

Every RPC gets a few hundred requests: structurally valid messages with hostile field values
(ids outside the vocabulary, negative or huge sizes, long strings, wrong shapes), and the same
bytes mutated (flipped, cut, grown, replaced). No answer may be INTERNAL or UNKNOWN, nothing may
be logged as an error, and afterwards a fixed set of reference calls returns exactly the bytes
it returned before.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from test_coordinator import KINDS, TOKENS, Env, errors_logged, md, raw_call

from pema.models import default_model_dir
from proto.gen.pemaservice.v1 import coordinator_pb2 as pb

SEED = 20261130
CASES = 200
C = grpc.StatusCode
CREDENTIALS: list[tuple[tuple[str, str], ...]] = [
    (),
    (("authorization", "Bearer not-a-token"),),
    (("authorization", f"Basic {TOKENS['alpha']}"),),
    (("authorization", "Bearer"),),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("fuzz"), default_model_dir())
    yield e
    for c in e.clients:
        c.close()
    e.server.stop(grace=1.0)


def ids(rng: random.Random, vocab: int) -> list[int]:
    n = rng.choice([0, 1, 2, 5, 12, 12, 300])
    pool = [0, 1, vocab - 1, vocab, vocab + 7, -1, -(2**31), 2**31 - 1]
    return [rng.choice(pool) if rng.random() < 0.1 else rng.randrange(vocab) for _ in range(n)]


def text(rng: random.Random) -> str:
    return rng.choice(
        ["", "float16", "float32", "int8", "\x00", "é" * 40, "y" * rng.randrange(3000)]
    )


def message(rng: random.Random, method: str, vocab: int) -> list[bytes]:
    """Structurally valid request(s) with hostile values."""
    if method in ("GetModelInfo", "GetTokenizer"):
        return [b""]
    if method == "GetHead":
        sizes = [-1, 0, 1, 65535, 65536, 1 << 20, 2**31 - 1, rng.randint(-(2**31), 2**31 - 1)]
        return [pb.GetHeadRequest(chunk_bytes=rng.choice(sizes)).SerializeToString()]
    if method == "Encode":
        items = [
            pb.EncodeItem(prompt=ids(rng, vocab), target=ids(rng, vocab))
            for _ in range(rng.choice([0, 1, 2, 4]))
        ]
        mode = rng.choice([0, 1, 2, 2, 1, 7, -1])
        return [pb.EncodeRequest(mode=mode, items=items).SerializeToString()]
    msgs = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["start", "start", "step", "step", "resume", "close", "empty"])
        if kind == "start":
            prompts = [pb.Prompt(ids=ids(rng, vocab)) for _ in range(rng.choice([0, 1, 3]))]
            m = pb.DecodeRequest(start=pb.DecodeStart(prompts=prompts, hidden_dtype=text(rng)))
        elif kind == "step":
            tokens = [rng.randrange(-2, vocab + 2) for _ in range(rng.choice([0, 1, 3, 50]))]
            m = pb.DecodeRequest(step=pb.DecodeStep(tokens=tokens))
        elif kind == "resume":
            m = pb.DecodeRequest(resume=pb.DecodeResume(session_id=text(rng)))
        elif kind == "close":
            m = pb.DecodeRequest(close=pb.DecodeClose())
        else:
            m = pb.DecodeRequest()
        msgs.append(m.SerializeToString())
    return msgs


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    how = rng.choice(["flip", "cut", "grow", "replace", "varint"])
    if how == "flip" and b:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif how == "cut" and b:
        del b[rng.randrange(len(b)) :]
    elif how == "grow":
        b[rng.randrange(len(b) + 1) : 0] = rng.randbytes(rng.randint(1, 64))
    elif how == "varint":
        b += b"\xff" * rng.randint(1, 20)
    else:
        b = bytearray(rng.randbytes(rng.randint(0, 128)))
    return bytes(b)


def references(env: Env) -> list[bytes]:
    """Reply bytes of fixed valid calls (decode session ids, random by design, cleared)."""
    channel = env.client("beta").channel
    out: list[bytes] = []
    for method in ("GetModelInfo", "GetTokenizer", "GetHead"):
        request = pb.GetHeadRequest() if method == "GetHead" else None
        payload = request.SerializeToString() if request else b""
        code, _, replies = raw_call(channel, method, [payload], md("beta"))
        assert code == C.OK
        out.extend(replies)
    items = [pb.EncodeItem(prompt=i.prompt, target=i.target) for i in env.items(3)]
    for mode in (pb.MEMORY_MODE_TEACHER_FORCED, pb.MEMORY_MODE_FREE_RUNNING):
        request = pb.EncodeRequest(mode=mode, items=items).SerializeToString()
        code, _, replies = raw_call(channel, "Encode", [request], md("beta"))
        assert code == C.OK and len(replies) == 3
        out.extend(sorted(replies))
    decode = [
        pb.DecodeRequest(
            start=pb.DecodeStart(
                prompts=[pb.Prompt(ids=i.prompt) for i in items], hidden_dtype="float32"
            )
        ),
        pb.DecodeRequest(step=pb.DecodeStep(tokens=[11, 12, 13])),
        pb.DecodeRequest(step=pb.DecodeStep(tokens=[400, 500, 600])),
        pb.DecodeRequest(close=pb.DecodeClose()),
    ]
    code, _, replies = raw_call(
        channel, "Decode", [m.SerializeToString() for m in decode], md("beta")
    )
    assert code == C.OK and len(replies) == 3
    for r in replies:
        reply = pb.DecodeReply.FromString(r)
        reply.session_id = ""
        out.append(reply.SerializeToString())
    return out


def test_fuzz(env: Env, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.INFO)
    rng = random.Random(SEED)
    vocab = env.local.info.vocab_size
    before = references(env)
    channel = env.client("alpha").channel
    seen: dict[C, int] = {}
    for case in range(CASES):
        method = rng.choice(list(KINDS))
        payloads = message(rng, method, vocab)
        if rng.random() < 0.4:
            i = rng.randrange(len(payloads))
            payloads[i] = mutate(rng, payloads[i])
        credentials = md("alpha") if rng.random() < 0.85 else rng.choice(CREDENTIALS)
        code, details, _ = raw_call(channel, method, payloads, credentials, timeout=20)
        seen[code] = seen.get(code, 0) + 1
        assert code not in (C.INTERNAL, C.UNKNOWN), (case, method, code, details)
        assert len(details) <= 600, (case, method, len(details))
    assert not errors_logged(caplog)
    assert seen.get(C.INVALID_ARGUMENT, 0) > CASES // 4 and seen.get(C.OK, 0) > 0, seen
    assert references(env) == before
    service = env.server.service
    assert service._active_calls == 0 and not service.in_flight()
