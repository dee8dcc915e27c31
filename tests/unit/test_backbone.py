"""FrozenLM: the head is lifted out right, and keys do not depend on how they are computed."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from tiny_model import make_tiny_gemma3
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, PreTrainedModel

from pema.backbone import EncodeItem, FrozenLM, LocalSession, MemoryMode, token_batches
from pema.errors import DataError

MakeLlama = Callable[..., LlamaForCausalLM]


def _random_ids(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def _pre_norm_states(model: PreTrainedModel, norm: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """What enters the model's final norm in a plain, unpadded forward pass (1 x L x d)."""
    seen: list[torch.Tensor] = []
    handle = norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def _tiny_gpt2(vocab: int = 500) -> GPT2LMHeadModel:
    torch.manual_seed(3)
    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # a non-trivial final LayerNorm, so a wrong norm would show
        model.transformer.ln_f.weight.uniform_(0.5, 1.5)
        model.transformer.ln_f.bias.normal_(0, 0.1)
    return model.requires_grad_(False)


def _assert_head_reproduces_logits(model: PreTrainedModel, vocab: int) -> None:
    reference = copy.deepcopy(model)
    ids = _random_ids(12, vocab, 0)
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor([ids])).logits[0].float()
    lm = FrozenLM(model, "tiny", "rev")
    hidden, _, _ = lm.forward_padded([ids])
    head_logits = lm.head()(hidden[0])
    torch.testing.assert_close(
        torch.softmax(head_logits, -1), torch.softmax(logits, -1), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(head_logits, logits, rtol=1e-4, atol=1e-4)
    # The keys are the *pre-norm* states: the ones the original model fed to its final norm.
    _, norm = next(
        (n, m) for n, m in reference.named_modules() if n.endswith(("model.norm", "ln_f"))
    )
    torch.testing.assert_close(
        hidden[0], _pre_norm_states(reference, norm, ids)[0], rtol=1e-5, atol=1e-5
    )


def test_head_reproduces_llama_distribution(make_llama: MakeLlama) -> None:
    model = make_llama(seed=1)
    with torch.no_grad():  # a non-trivial RMSNorm weight
        model.model.norm.weight.uniform_(0.5, 1.5)
    _assert_head_reproduces_logits(model, model.config.vocab_size)
    assert FrozenLM(make_llama(), "t", "r").info.norm_kind == "rms"


def test_head_reproduces_gpt2_distribution() -> None:
    model = _tiny_gpt2()
    _assert_head_reproduces_logits(model, 500)
    info = FrozenLM(_tiny_gpt2(), "t", "r").info
    assert info.norm_kind == "layer"
    assert info.max_length == 128
    assert info.hidden_size == 32 and info.vocab_size == 500


@pytest.mark.parametrize("softcap", [None, 0.1], ids=["plain", "softcap"])
def test_head_reproduces_gemma3_distribution(softcap: float | None) -> None:
    """Gemma3 differs from Llama where the head is concerned: its RMSNorm scales by (1 + w) and
    it may soft-cap the final logits (0.1 bites on this tiny model's logits of about ±0.3)."""
    model = make_tiny_gemma3(seed=1, softcap=softcap)
    _assert_head_reproduces_logits(model, model.config.vocab_size)
    lm = FrozenLM(make_tiny_gemma3(seed=1, softcap=softcap), "t", "r")
    assert lm.head_spec.norm_weight_offset == 1.0
    assert lm.head_spec.softcap == softcap
    assert lm.info.norm_kind == "rms" and lm.info.vocab_size == 300


def test_gemma3_sliding_window_keys_do_not_depend_on_batching() -> None:
    """Sequences longer than the sliding window, left-padded in a batch or decoded through a
    session's sliding-window cache, see what they would see alone."""
    lm = FrozenLM(make_tiny_gemma3(seed=2), "tiny", "rev")
    assert not lm.batchable_decode  # sliding-window caches are never stacked across sessions
    items = _items(lm.info.vocab_size)
    for mode in MemoryMode:
        batched = lm.encode(items, mode)
        for item, enc in zip(items, batched, strict=True):
            (alone,) = lm.encode([item], mode)
            torch.testing.assert_close(enc.keys, alone.keys, rtol=1e-5, atol=1e-5)
            assert enc.generated == alone.generated
            if enc.generated is not None:
                (forced,) = lm.encode(
                    [EncodeItem(item.prompt, enc.generated)], MemoryMode.TEACHER_FORCED
                )
                torch.testing.assert_close(enc.keys, forced.keys, rtol=1e-5, atol=1e-5)
    reference = make_tiny_gemma3(seed=2)
    prompts = [_random_ids(7, 300, 30), _random_ids(2, 300, 31)]
    steps = [_random_ids(6, 300, 40 + i) for i in range(2)]
    session = lm.session()
    states = [session.start(prompts)]
    for t in range(6):
        states.append(session.step([steps[i][t] for i in range(2)]))
    session.close()
    for i in range(2):
        plain = _pre_norm_states(reference, reference.model.norm, prompts[i] + steps[i])[0]
        got = torch.stack([s[i] for s in states])
        torch.testing.assert_close(got, plain[len(prompts[i]) - 1 :], rtol=1e-5, atol=1e-5)


def test_gpt2_free_running_matches_teacher_forced() -> None:
    lm = FrozenLM(_tiny_gpt2(), "tiny", "rev")
    items = [EncodeItem(_random_ids(9, 500, 1), _random_ids(6, 500, 2))]
    (free,) = lm.encode(items, MemoryMode.FREE_RUNNING)
    assert free.generated is not None
    (forced,) = lm.encode([EncodeItem(items[0].prompt, free.generated)], MemoryMode.TEACHER_FORCED)
    torch.testing.assert_close(free.keys, forced.keys, rtol=1e-5, atol=1e-5)


@pytest.fixture
def frozen(make_llama: MakeLlama) -> FrozenLM:
    return FrozenLM(make_llama(seed=2), "tiny", "rev")


def _items(vocab: int) -> list[EncodeItem]:
    # Different prompt and target lengths, so rows are left-padded in a batch.
    shapes = [(5, 7), (11, 3), (8, 9), (2, 1)]
    return [
        EncodeItem(_random_ids(p, vocab, 10 + i), _random_ids(t, vocab, 20 + i))
        for i, (p, t) in enumerate(shapes)
    ]


def test_teacher_forced_keys_are_pre_norm_states_at_target_contexts(frozen: FrozenLM) -> None:
    vocab = frozen.info.vocab_size
    item = _items(vocab)[0]
    (enc,) = frozen.encode([item], MemoryMode.TEACHER_FORCED)
    assert enc.generated is None
    assert enc.keys.shape == (len(item.target), frozen.info.hidden_size)
    assert enc.keys.dtype == torch.float32
    full = list(item.prompt) + list(item.target)
    hidden, _, _ = frozen.forward_padded([full])
    # key t is the state after prompt + y_<t: positions len(prompt)-1 .. len(full)-2.
    expected = hidden[0, len(item.prompt) - 1 : len(full) - 1]
    torch.testing.assert_close(enc.keys, expected, rtol=1e-5, atol=1e-6)


def test_free_running_keys_equal_teacher_forcing_own_greedy_tokens(frozen: FrozenLM) -> None:
    items = _items(frozen.info.vocab_size)
    free = frozen.encode(items, MemoryMode.FREE_RUNNING)
    for item, enc in zip(items, free, strict=True):
        assert enc.generated is not None and len(enc.generated) == len(item.target)
        assert enc.keys.shape == (len(item.target), frozen.info.hidden_size)
        (forced,) = frozen.encode(
            [EncodeItem(item.prompt, enc.generated)], MemoryMode.TEACHER_FORCED
        )
        torch.testing.assert_close(enc.keys, forced.keys, rtol=1e-5, atol=1e-5)
        # And the generated tokens are the head's greedy picks on those very keys.
        assert frozen.head()(forced.keys).argmax(-1).tolist() == enc.generated


@pytest.mark.parametrize("mode", list(MemoryMode))
def test_left_padded_batch_equals_each_alone(frozen: FrozenLM, mode: MemoryMode) -> None:
    items = _items(frozen.info.vocab_size)
    lengths = [len(it.prompt) + len(it.target) for it in items]
    assert len(list(token_batches(lengths, frozen.max_batch_tokens))) == 1  # one padded batch
    batched = frozen.encode(items, mode)
    for item, enc in zip(items, batched, strict=True):
        (alone,) = frozen.encode([item], mode)
        torch.testing.assert_close(enc.keys, alone.keys, rtol=1e-5, atol=1e-5)
        assert enc.generated == alone.generated


def test_batches_split_by_token_budget_keep_order(make_llama: MakeLlama) -> None:
    small = FrozenLM(make_llama(seed=2), "tiny", "rev", max_batch_tokens=24)
    items = _items(small.info.vocab_size)
    seen: list[int] = []
    split = small.encode(items, MemoryMode.TEACHER_FORCED, progress=seen.append)
    assert sum(seen) == len(items) and len(seen) > 1
    for item, enc in zip(items, split, strict=True):
        (alone,) = small.encode([item], MemoryMode.TEACHER_FORCED)
        torch.testing.assert_close(enc.keys, alone.keys, rtol=1e-5, atol=1e-5)


def test_session_states_equal_plain_forward(frozen: FrozenLM, make_llama: MakeLlama) -> None:
    reference = make_llama(seed=2)  # same weights as `frozen`, its norm still in place
    vocab = frozen.info.vocab_size
    prompts = [_random_ids(6, vocab, 30), _random_ids(2, vocab, 31), _random_ids(4, vocab, 32)]
    steps = [_random_ids(5, vocab, 40 + i) for i in range(3)]
    session = LocalSession(frozen)
    states = [session.start(prompts)]
    for t in range(5):
        states.append(session.step([steps[i][t] for i in range(3)]))
    session.close()
    for i in range(3):
        full = prompts[i] + steps[i]
        plain = _pre_norm_states(reference, reference.model.norm, full)[0]
        got = torch.stack([s[i] for s in states])  # states after prompt, then after each step
        torch.testing.assert_close(got, plain[len(prompts[i]) - 1 :], rtol=1e-5, atol=1e-5)


def test_session_and_encode_reject_bad_input(frozen: FrozenLM) -> None:
    vocab = frozen.info.vocab_size
    with pytest.raises(DataError):
        frozen.encode([EncodeItem([1, 2], [])], MemoryMode.TEACHER_FORCED)
    with pytest.raises(DataError):
        frozen.encode([EncodeItem([1, vocab], [3])], MemoryMode.TEACHER_FORCED)
    too_long = EncodeItem([5] * 400, [6] * 113)  # 513 > 512 positions
    with pytest.raises(DataError, match="limit"):
        frozen.encode([too_long], MemoryMode.TEACHER_FORCED)
    session = frozen.session()
    session.start([[1, 2, 3]])
    with pytest.raises(DataError):
        session.step([1, 2])


def test_free_running_batch_of_items_each_within_limit(make_llama: MakeLlama) -> None:
    """Items that each fit the model's limit must encode, whatever they are batched with."""
    lm = FrozenLM(make_llama(seed=4, max_position_embeddings=64), "tiny", "rev")
    vocab = lm.info.vocab_size
    items = [
        EncodeItem(_random_ids(56, vocab, 50), _random_ids(8, vocab, 51)),  # 64 tokens
        EncodeItem(_random_ids(8, vocab, 52), _random_ids(56, vocab, 53)),  # 64 tokens
    ]
    batched = lm.encode(items, MemoryMode.FREE_RUNNING)
    for item, enc in zip(items, batched, strict=True):
        (alone,) = lm.encode([item], MemoryMode.FREE_RUNNING)
        torch.testing.assert_close(enc.keys, alone.keys, rtol=1e-5, atol=1e-5)
        assert enc.generated == alone.generated
