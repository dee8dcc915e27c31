"""Peer methods on a tiny random Llama (hidden 32, 2 layers) with the default model's tokenizer."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from pema.data import Pair
from pema.models import default_model_dir
from pema.peers.lora import AdaMixPeer, LoRALinear, MixLoRALinear, full_peer, lora_peer
from pema.peers.sft import (
    HFPeer,
    Peer,
    SFTConfig,
    collate,
    encode_pairs,
    greedy_generate,
    train_sft,
)
from pema.peers.shift import ShiftPeer
from pema.prompts import PromptFormat


@pytest.fixture(scope="module")
def fmt() -> PromptFormat:
    return PromptFormat(AutoTokenizer.from_pretrained(default_model_dir()))


def tiny_llama(vocab: int) -> PreTrainedModel:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config)
    model.requires_grad_(False)
    return model


PAIRS = [
    Pair("And God said, Let there be light.", "God said, “Let there be light.”"),
    Pair("In the beginning God created the heaven.", "In the beginning, God created the heavens."),
]

BUILDERS: dict[str, Callable[[PreTrainedModel], Peer]] = {
    "lora": lambda m: lora_peer(m, rank=4, alpha=8),
    "full": full_peer,
    "adamix": lambda m: AdaMixPeer(m, rank=4, alpha=8, mixture=3),
    "slash": lambda m: ShiftPeer(m, "slash", k=64),
    "jrwarp": lambda m: ShiftPeer(m, "jrwarp", k=64),
}
LR = {"lora": 1e-2, "full": 1e-3, "adamix": 1e-2, "slash": 5e-2, "jrwarp": 0.3}


@pytest.mark.parametrize("method", list(BUILDERS))
def test_training_lowers_the_target_loss(fmt: PromptFormat, method: str) -> None:
    peer = BUILDERS[method](tiny_llama(len(fmt.tokenizer)))
    items = encode_pairs(fmt, PAIRS, 96)
    batch = collate(items, fmt.eos_id)
    peer.eval()
    with torch.no_grad():
        before = float(peer.loss(batch))
    report = train_sft(peer, items, SFTConfig(lr=LR[method], batch_size=2, epochs=8), fmt.eos_id)
    with torch.no_grad():
        after = float(peer.loss(batch))
    assert report.steps == 8
    assert after < before - 1e-3


def test_loss_covers_target_tokens_only(fmt: PromptFormat) -> None:
    items = encode_pairs(fmt, PAIRS, 96)
    batch = collate(items, fmt.eos_id)
    for row, it in enumerate(items):
        labelled = batch.labels[row][batch.labels[row] != -100].tolist()
        assert labelled == list(it.target)
        assert labelled[-1] == fmt.eos_id
    short = encode_pairs(fmt, PAIRS, len(items[0].prompt) + 3)
    assert len(short[0].target) == 3 and short[0].prompt == items[0].prompt


def test_adamix_merges_into_one_lora_sized_module(fmt: PromptFormat) -> None:
    vocab = len(fmt.tokenizer)
    peer = AdaMixPeer(tiny_llama(vocab), rank=4, alpha=8, mixture=3)
    mixes = [m for m in peer.model.modules() if isinstance(m, MixLoRALinear)]
    assert len(mixes) == 4  # q_proj and v_proj in 2 layers
    assert all(torch.equal(m.A[0], m.A[i]) for m in mixes for i in range(3))  # identical init
    with torch.no_grad():
        for m in mixes:  # copies as training would leave them: different
            m.A.add_(torch.randn_like(m.A))
            m.B.normal_()
    mix = mixes[0]
    x = torch.randn(5, 32)
    reference = nn.Linear(32, 32, bias=False)
    with torch.no_grad():
        reference.weight.copy_(mix.base.weight + mix.scaling * mix.B @ mix.A.mean(0))
    merged = mix.merged()
    assert isinstance(merged, LoRALinear)
    torch.testing.assert_close(merged(x), reference(x))
    mix.eval()
    torch.testing.assert_close(mix(x), reference(x))
    peer.eval()
    ids = collate(encode_pairs(fmt, PAIRS, 96), fmt.eos_id)
    with torch.no_grad():
        before = peer.logits(ids.input_ids, ids.attention_mask)
        peer.prepare_inference()
        after = peer.logits(ids.input_ids, ids.attention_mask)
    torch.testing.assert_close(before, after)
    assert not any(isinstance(m, MixLoRALinear) for m in peer.model.modules())
    plain = get_peft_model(
        tiny_llama(vocab), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    plain_count = sum(p.numel() for p in plain.parameters() if p.requires_grad)
    served = sum(
        p.numel() for m in peer.model.modules() if isinstance(m, LoRALinear) for p in (m.A, m.B)
    )
    assert served == plain_count == peer.inference_parameter_count()


def test_adamix_routes_one_copy_and_adds_consistency(fmt: PromptFormat) -> None:
    peer = AdaMixPeer(tiny_llama(len(fmt.tokenizer)), rank=4, alpha=8, mixture=3)
    peer.train()
    batch = collate(encode_pairs(fmt, PAIRS, 96), fmt.eos_id)
    with torch.no_grad():
        for m in peer.model.modules():
            if isinstance(m, MixLoRALinear):
                m.A.normal_()
                m.B.normal_()
    peer.loss(batch).backward()
    mix = next(m for m in peer.model.modules() if isinstance(m, MixLoRALinear))
    assert mix.A.grad is not None
    touched = int((mix.A.grad.flatten(1).abs().sum(1) > 0).sum())
    assert 1 <= touched <= 2  # two passes, one random copy each
    peer.consistency = 0.0
    torch.manual_seed(1)
    ce_only = float(peer.loss(batch).detach())
    peer.consistency = 1.0
    torch.manual_seed(1)
    assert float(peer.loss(batch)) >= ce_only


@pytest.mark.parametrize("method", ["slash", "jrwarp"])
def test_shift_trains_only_z_and_keeps_w_fixed(fmt: PromptFormat, method: str) -> None:
    peer = ShiftPeer(tiny_llama(len(fmt.tokenizer)), method, k=64, seed=3)
    assert [p.numel() for p in peer.trainable()] == [64]
    assert peer.inference_parameter_count() == 64
    w_before = peer.W.clone()
    assert "W" not in peer.state_dict()  # regenerated from the seed, never saved
    assert torch.equal(ShiftPeer(tiny_llama(len(fmt.tokenizer)), method, k=64, seed=3).W, w_before)
    assert abs(float(w_before.var()) - 1 / 64) < 2e-3
    z_before = peer.z_source.z.detach().clone()
    train_sft(peer, encode_pairs(fmt, PAIRS, 96), SFTConfig(lr=5e-2, batch_size=2, epochs=2), 0)
    assert torch.equal(peer.W, w_before)
    assert not torch.equal(peer.z_source.z, z_before)


@pytest.mark.parametrize("method", ["slash", "jrwarp"])
def test_precomputed_shifts_give_identical_outputs(fmt: PromptFormat, method: str) -> None:
    peer = ShiftPeer(tiny_llama(len(fmt.tokenizer)), method, k=64)
    with torch.no_grad():
        peer.z_source.z.normal_()
    batch = collate(encode_pairs(fmt, PAIRS, 96), fmt.eos_id)
    peer.eval()
    prompts = [fmt.prompt_ids(p.source) for p in PAIRS]
    with torch.no_grad():
        live = peer.logits(batch.input_ids, batch.attention_mask)
        live_ids = greedy_generate(peer, prompts, fmt.stop_ids, [6, 6], fmt.eos_id)
        peer.prepare_inference()
        fixed = peer.logits(batch.input_ids, batch.attention_mask)
        fixed_ids = greedy_generate(peer, prompts, fmt.stop_ids, [6, 6], fmt.eos_id)
    torch.testing.assert_close(live, fixed, rtol=0, atol=1e-6)
    assert live_ids == fixed_ids
    peer.train()  # training again drops the stale precomputed copy
    assert peer._precomputed is None


@pytest.mark.parametrize("method", ["lora", "slash", "jrwarp"])
def test_cached_greedy_matches_full_recompute(fmt: PromptFormat, method: str) -> None:
    """The KV-cached loop (and JR-WARP's prompt position in the cache) agrees with recomputing
    the whole sequence at every step."""
    peer = BUILDERS[method](tiny_llama(len(fmt.tokenizer)))
    if isinstance(peer, ShiftPeer):
        with torch.no_grad():
            peer.z_source.z.normal_()
    peer.eval()
    prompt = fmt.prompt_ids(PAIRS[0].source)
    [cached] = greedy_generate(peer, [prompt], frozenset(), [5], fmt.eos_id)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            ids = torch.tensor([seq])
            seq.append(int(peer.logits(ids, torch.ones_like(ids))[0, -1].argmax()))
    assert cached == seq[len(prompt) :]


def test_untuned_peer_has_nothing_to_train(fmt: PromptFormat) -> None:
    model = tiny_llama(len(fmt.tokenizer))
    assert HFPeer(model, model.config).trainable() == []
