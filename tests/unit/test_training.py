"""Two-phase training on a toy memory from a tiny model; the residual variant's starting point;
the early-stopping rule."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from transformers import LlamaForCausalLM

from pema.adapter import AdapterConfig, PemaAdapter
from pema.backbone import EncodeItem, FrozenLM, MemoryMode
from pema.errors import PemaError
from pema.memory import Memory, MemorySpec, build_memory
from pema.training import EarlyStop, TrainConfig, TrainEvent, evaluate_memory, train_adapter

VOCAB = 2048


def _toy_items(n: int, seed: int) -> list[EncodeItem]:
    """A task with structure: the target repeats a fixed frame and copies two prompt tokens."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        prompt = torch.randint(100, 108, (6,), generator=g).tolist()
        target = [7, 8, prompt[0] + 1000, 9, 10, prompt[1] + 1000, 11, 2]
        items.append(EncodeItem(prompt, target))
    return items


@pytest.fixture(scope="module")
def toy(
    make_llama: Callable[..., LlamaForCausalLM],
) -> tuple[FrozenLM, Memory, Memory]:
    # A small vocabulary keeps the many head passes of training fast. The random head's logits
    # are scaled up (a larger final-norm weight), as a trained model's are: with the default
    # init every logit is within about +-0.6 and no adapter could make a confident prediction.
    model = make_llama(seed=6, vocab_size=VOCAB)
    with torch.no_grad():
        model.model.norm.weight.fill_(20.0)
    lm = FrozenLM(model, "tiny", "rev")
    spec = MemorySpec("rev", "toy", "T", MemoryMode.TEACHER_FORCED.value)
    train = build_memory(lm, _toy_items(48, 1), spec)
    valid = build_memory(lm, _toy_items(12, 2), MemorySpec("rev", "toy-valid", "T", spec.mode))
    assert len(train) == 384 and len(valid) == 96
    return lm, train, valid


CFG = TrainConfig(
    lr=3e-2,
    rct_batch_size=128,
    batch_size=32,
    rct_epochs=2,
    epochs=12,
    eval_every=6,
    ce_chunk_size=50,
    head_matmul_dtype="float32",
)


@pytest.mark.parametrize(
    ("variant", "key_norm", "kappa"),
    [
        ("faithful", "raw", 0.2),
        ("faithful", "rms", 0.2),
        ("residual", "rms", 0.0),
        ("residual", "raw", 0.2),
    ],
)
def test_training_lowers_validation_loss(
    toy: tuple[FrozenLM, Memory, Memory], variant: str, key_norm: str, kappa: float
) -> None:
    lm, train, valid = toy
    head = lm.head()
    adapter = PemaAdapter(
        AdapterConfig(hidden_size=32, rank=16, variant=variant, key_norm=key_norm, kappa=kappa)
    )
    before = evaluate_memory(adapter, head, valid)
    events: list[TrainEvent] = []
    report = train_adapter(adapter, head, train, valid, CFG, events.append)
    after = report.valid
    # Untrained, P_PEMA is uniform (faithful) or the random model's own guess (residual).
    assert before["ce"] > math.log(head.vocab_size) - 1
    assert before["top1"] < 0.05 and after["model_top1"] < 0.05
    # Trained: the frame is learned (6 of 8 tokens; the copied ones come from 8 choices).
    assert after["ce"] < before["ce"] - 4, (before, after)
    assert after["loss"] < before["loss"]
    assert after["top1"] > 0.4, after
    # Phase 1 runs only when the joint loss uses reconstruction, and then lowers the MSE.
    assert (1 in report.phases) == (kappa > 0)
    if kappa > 0:
        # B_rct starts at zero, so the untrained reconstruction error is the keys' mean square.
        assert report.phases[1].best_valid < 0.9 * before["mse"], report.phases[1].history
    assert report.phases[2].steps > 0
    assert {e.kind for e in events} == {"step", "valid"}
    # The adapter left behind is the best validated one.
    assert after["loss"] == pytest.approx(report.phases[2].best_valid, rel=1e-6)
    assert not adapter.training


def test_residual_with_zero_b_pd_is_the_models_own_distribution(
    toy: tuple[FrozenLM, Memory, Memory],
) -> None:
    lm, train, _ = toy
    head = lm.head()
    # Real pre-norm states have an RMS in the tens (METHODS.md: mean |x| about 22); the random
    # model's are about 0.02, where the norms' eps (1e-6 against a mean square of 4e-4) would
    # shift the scale by 0.1 %. At the real scale, eps is invisible.
    keys = train.keys[:64].float() * 1000
    assert keys.pow(2).mean().sqrt() > 5
    own = head.log_probs(keys)
    for key_norm in ("raw", "rms"):
        adapter = PemaAdapter(
            AdapterConfig(hidden_size=32, rank=8, variant="residual", key_norm=key_norm)
        )
        assert not adapter.B_pd.any()
        with torch.no_grad():
            adapter.B_rct.normal_()  # training-only weights do not matter
        for mode in (adapter.eval, adapter.train):  # nor does dropout
            mode()
            with torch.no_grad():
                torch.testing.assert_close(head.log_probs(adapter(keys)), own, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        adapter.B_pd.normal_()
        assert not torch.allclose(head.log_probs(adapter.eval()(keys)), own, atol=1e-3)


def test_faithful_with_zero_b_pd_is_uniform(toy: tuple[FrozenLM, Memory, Memory]) -> None:
    lm, train, _ = toy
    head = lm.head()
    adapter = PemaAdapter(AdapterConfig(hidden_size=32, rank=8)).eval()
    with torch.no_grad():
        logp = head.log_probs(adapter(train.keys[:4]))
    torch.testing.assert_close(logp, torch.full_like(logp, -math.log(head.vocab_size)))


@pytest.mark.parametrize(
    ("losses", "stop_at"),
    [
        ([3.0, 2.0, 1.0, 0.5], None),  # steadily falling
        ([1.0, 2.0, 3.0], 3),  # rises above both previous
        ([3.0, 2.0, 2.5, 2.6], 4),  # 2.5 is below 3.0; 2.6 tops 2.5 and 2.0
        ([3.0, 2.0, 2.5, 2.4, 2.45], None),  # never above both previous
        ([2.0, 2.0, 2.0, 2.0], None),  # equal is not above
        ([1.0, 5.0], None),  # needs two previous validations
    ],
)
def test_early_stop_rule(losses: list[float], stop_at: int | None) -> None:
    stopper = EarlyStop()
    decisions = [stopper.should_stop(x) for x in losses]
    expected = [stop_at is not None and i + 1 == stop_at for i in range(len(losses))]
    assert decisions == expected


def test_training_stops_early_and_keeps_the_best_adapter(
    toy: tuple[FrozenLM, Memory, Memory],
) -> None:
    lm, train, valid = toy
    head = lm.head()
    adapter = PemaAdapter(AdapterConfig(hidden_size=32, rank=16, variant="residual", kappa=0.0))
    # A learning rate far too high makes the validation loss rise: training must stop early.
    cfg = TrainConfig(lr=3.0, batch_size=32, epochs=20, eval_every=1, head_matmul_dtype="float32")
    report = train_adapter(adapter, head, train, valid, cfg)
    p2 = report.phases[2]
    assert p2.stopped_early
    assert p2.epochs_run < 20
    losses = [h["loss"] for h in p2.history]
    assert losses[-1] > losses[-2] and losses[-1] > losses[-3]
    assert p2.best_valid == min(losses)
    assert report.valid["loss"] == pytest.approx(min(losses), rel=1e-6)


def test_time_budget_stops_at_the_first_validation_past_it(
    toy: tuple[FrozenLM, Memory, Memory],
) -> None:
    lm, train, valid = toy
    adapter = PemaAdapter(AdapterConfig(hidden_size=32, rank=16, variant="residual", kappa=0.0))
    cfg = TrainConfig(
        batch_size=32, epochs=20, eval_every=2, head_matmul_dtype="float32", time_budget_s=1e-9
    )
    p2 = train_adapter(adapter, lm.head(), train, valid, cfg).phases[2]
    assert p2.out_of_time and not p2.stopped_early
    assert [h["step"] for h in p2.history] == [2]
    assert p2.epochs_run == 1 and p2.steps == 2
    with pytest.raises(PemaError, match="time_budget_s"):
        TrainConfig(time_budget_s=0)


def test_training_input_checks(toy: tuple[FrozenLM, Memory, Memory]) -> None:
    lm, train, valid = toy
    empty = valid.split_pairs([])
    with pytest.raises(PemaError):
        train_adapter(PemaAdapter(AdapterConfig(hidden_size=32, rank=4)), lm.head(), train, empty)
    with pytest.raises(PemaError):
        train_adapter(PemaAdapter(AdapterConfig(hidden_size=16, rank=4)), lm.head(), train, valid)
    with pytest.raises(PemaError):
        TrainConfig(batch_size=0)
    with pytest.raises(PemaError):
        TrainConfig(head_matmul_dtype="float16")
