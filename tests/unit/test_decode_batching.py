"""Continuous batching of decode: sessions stepped together get exactly their solo tokens, join
and leave between steps, fail alone on bad input, and share the model worker fairly with encode.

All in fp32 on a tiny random Llama (larger weights than the default init, so greedy picks are not
near-ties), with the real model worker thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import pytest
import torch
from tiny_model import make_tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from coordinator.metrics import Metrics
from coordinator.worker import EncodeJob, ModelWorker
from pema.backbone import Encoded, EncodeItem, FrozenLM, LocalSession, MemoryMode
from pema.errors import DataError, ModelError

STEPS = 6


@pytest.fixture(scope="module")
def lm(tokenizer: PreTrainedTokenizerBase) -> FrozenLM:
    return FrozenLM(make_tiny_llama(tokenizer, 5, 256, init_std=0.2), "tiny", "rev")


def _prompts(vocab: int) -> list[list[list[int]]]:
    """Sessions of one or two rows, of different lengths (rows are left-padded within one)."""
    g = torch.Generator().manual_seed(7)
    shapes = ([5], [9, 3], [2], [12], [4, 7])
    return [[torch.randint(3, vocab, (n,), generator=g).tolist() for n in s] for s in shapes]


def _solo(
    lm: FrozenLM, prompts: Sequence[Sequence[int]]
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens and states of one session stepped alone."""
    head = lm.head()
    session = lm.session()
    h = session.start(prompts)
    tokens, states = [], [h]
    for _ in range(STEPS):
        t = head(h).argmax(-1).tolist()
        tokens.append(t)
        h = session.step(t)
        states.append(h)
    session.close()
    return tokens, states


def _assert_same(got: tuple[list[list[int]], list[torch.Tensor]], want: tuple) -> None:
    assert got[0] == want[0]
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sessions_joining_and_leaving_get_their_solo_tokens(lm: FrozenLM) -> None:
    prompts = _prompts(lm.info.vocab_size)
    solo = [_solo(lm, p) for p in prompts]
    head = lm.head()
    starts = [0, 0, 2, 3, 5]  # sessions join mid-stream; each leaves after STEPS steps
    sessions = [lm.session() for _ in prompts]
    state: dict[int, torch.Tensor] = {}
    got: dict[int, tuple[list[list[int]], list[torch.Tensor]]] = {
        i: ([], []) for i in range(len(prompts))
    }
    widths = []
    for tick in range(12):
        steps: list[tuple[int, LocalSession, list[int]]] = []
        for i, s in enumerate(sessions):
            if tick == starts[i]:
                state[i] = s.start(prompts[i])
                got[i][1].append(state[i])
            elif tick > starts[i] and len(got[i][0]) < STEPS:
                t = head(state[i]).argmax(-1).tolist()
                got[i][0].append(t)
                steps.append((i, s, t))
        widths.append(len(steps))
        for (i, _, _), h in zip(
            steps, lm.step_sessions([(s, t) for _, s, t in steps]), strict=True
        ):
            state[i] = h
            got[i][1].append(h)
    assert max(widths) >= 3 and len(set(widths)) > 2  # groups really changed between steps
    for i in range(len(prompts)):
        _assert_same(got[i], solo[i])


def test_gpt2_sessions_batch_too() -> None:
    torch.manual_seed(3)
    cfg = GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    lm = FrozenLM(GPT2LMHeadModel(cfg).eval().requires_grad_(False), "gpt2", "rev")
    prompts = [[[5, 6, 7]], [[8, 9, 10, 11, 12, 13], [14]]]
    solo = [_solo(lm, p) for p in prompts]
    a, b = lm.session(), lm.session()
    ha, hb = a.start(prompts[0]), b.start(prompts[1])
    head = lm.head()
    for t in range(STEPS):
        ta, tb = solo[0][0][t], solo[1][0][t]
        assert head(ha).argmax(-1).tolist() == ta and head(hb).argmax(-1).tolist() == tb
        ha, hb = lm.step_sessions([(a, ta), (b, tb)])


def test_a_session_steps_once_per_batch_and_not_after_close(lm: FrozenLM) -> None:
    s = lm.session()
    s.start([[3, 4]])
    with pytest.raises(ModelError, match="one step per batch"):
        lm.step_sessions([(s, [5]), (s, [6])])
    s.close()
    with pytest.raises(ModelError, match="closed"):
        s.step([5])


# -- the model worker ----------------------------------------------------------------------------


@pytest.fixture
def worker(lm: FrozenLM) -> Iterator[ModelWorker]:
    w = ModelWorker(lm, Metrics(["a", "b"]), max_batch_tokens=96, max_queued_tokens=1 << 20)
    w.start()
    yield w
    w.stop()


def _decode_loop(
    worker: ModelWorker,
    lm: FrozenLM,
    prompts: Sequence[Sequence[int]],
    steps: int,
    started: threading.Barrier | None = None,
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """A client of the worker: start a session, (wait for the other clients' sessions,) then
    step it greedily, one call at a time."""
    head = lm.head()
    session = lm.session()
    h = worker.call(lambda: session.start(prompts)).result(timeout=30)
    if started is not None:
        started.wait(timeout=30)
    tokens, states = [], [h]
    for _ in range(steps):
        t = head(h).argmax(-1).tolist()
        tokens.append(t)
        h = worker.step(session, t).result(timeout=30)
        states.append(h)
    session.close()
    return tokens, states


def test_concurrent_sessions_are_batched_and_get_their_solo_tokens(
    worker: ModelWorker, lm: FrozenLM
) -> None:
    prompts = _prompts(lm.info.vocab_size)
    solo = [_solo(lm, p) for p in prompts]
    results: dict[int, tuple[list[list[int]], list[torch.Tensor]]] = {}
    # Sessions start at different moments, then step side by side: a step of the tiny model
    # takes about a millisecond, so clients that merely overlapped by chance could each finish
    # alone on a slow or busy machine.
    started = threading.Barrier(len(prompts))

    def client(i: int) -> None:
        time.sleep(0.01 * i)
        results[i] = _decode_loop(worker, lm, prompts[i], STEPS, started)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i in range(len(prompts)):
        _assert_same(results[i], solo[i])
    rows = worker.metrics.decode_batch_rows.collect()[0].samples
    passes = next(s.value for s in rows if s.name.endswith("_count"))
    steps = sum(len(p) for p in prompts) * STEPS
    assert passes < sum(STEPS for _ in prompts)  # fewer passes than session steps: batched
    assert next(s.value for s in rows if s.name.endswith("_sum")) == steps


def test_a_bad_step_fails_alone(worker: ModelWorker, lm: FrozenLM) -> None:
    good, bad = lm.session(), lm.session()
    with worker.hold():
        first = worker.call(lambda: good.start([[3, 4, 5]]))
        worker.call(lambda: bad.start([[6, 7]]))
    h = first.result(timeout=30)
    with worker.hold():  # both steps land in one pass
        ok = worker.step(good, [int(lm.head()(h).argmax())])
        wrong = worker.step(bad, [1, 2])  # two tokens for a one-row session
    with pytest.raises(DataError, match="expected 1 tokens"):
        wrong.result(timeout=30)
    assert ok.result(timeout=30).shape == (1, lm.info.hidden_size)


def _encode_jobs(lm: FrozenLM, n: int, log: list[str]) -> list[EncodeJob]:
    def deliver(index: int, result: Encoded | BaseException) -> None:
        assert not isinstance(result, BaseException)
        log.append("encode")

    g = torch.Generator().manual_seed(1)
    return [
        EncodeJob(
            "a",
            i,
            EncodeItem(torch.randint(3, 999, (20,), generator=g).tolist(), [5, 6, 7, 8]),
            MemoryMode.TEACHER_FORCED,
            deliver,
            threading.Event(),
        )
        for i in range(n)
    ]


def test_decode_is_not_starved_by_queued_encode(worker: ModelWorker, lm: FrozenLM) -> None:
    session = lm.session()
    worker.call(lambda: session.start([[3, 4, 5]])).result(timeout=30)
    log: list[str] = []
    with worker.hold():
        worker.submit_encode(_encode_jobs(lm, 40, log))  # 24 tokens each: 4 per pass, 10 passes
        step = worker.step(session, [9])
        step.add_done_callback(lambda _: log.append("decode"))
    step.result(timeout=30)
    deadline = time.monotonic() + 60
    while len(log) < 41 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.count("encode") == 40
    assert log.index("decode") <= 4  # after at most one encode pass, not after all ten


def test_encode_is_not_starved_by_busy_decode(worker: ModelWorker, lm: FrozenLM) -> None:
    log: list[str] = []
    stop = threading.Event()
    stepped = [0]

    def busy_client() -> None:
        session = lm.session()
        worker.call(lambda: session.start([[3, 4, 5]])).result(timeout=30)
        while not stop.is_set():
            worker.step(session, [9]).result(timeout=30)
            stepped[0] += 1
        session.close()

    clients = [threading.Thread(target=busy_client) for _ in range(2)]
    for c in clients:
        c.start()
    while stepped[0] < 4:
        time.sleep(0.01)
    worker.submit_encode(_encode_jobs(lm, 12, log))
    deadline = time.monotonic() + 60
    while len(log) < 12 and time.monotonic() < deadline:
        time.sleep(0.02)
    during = stepped[0]
    stop.set()
    for c in clients:
        c.join(timeout=30)
    assert len(log) == 12  # every encode item finished while decode kept the worker busy
    assert during > 4  # and decode kept stepping meanwhile
