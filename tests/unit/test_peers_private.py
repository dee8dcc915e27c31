"""DP-SGD (Opacus) for the PEMA adapter and SLaSh/JR-WARP, and AdaMix on PEMA (pema-mix)."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from pema.adapter import AdapterConfig, PemaAdapter, load_adapter, save_adapter
from pema.data import Pair
from pema.head import HeadSpec, LMHead
from pema.memory import Memory, MemorySpec
from pema.models import default_model_dir
from pema.peers.private import (
    _AdapterCore,
    _engine_setup,
    _pair_batch,
    _per_pair_ce,
    train_peer_private,
)
from pema.peers.sft import SFTConfig, collate, encode_pairs
from pema.peers.shift import ShiftPeer
from pema.prompts import PromptFormat
from pema.training import TrainConfig, train_adapter

D, V = 16, 40


def tiny_head() -> LMHead:
    g = torch.Generator().manual_seed(0)
    return LMHead(
        HeadSpec("rms", 1e-6, torch.ones(D), None, 0.0, torch.randn(V, D, generator=g), None, None)
    )


def tiny_memory(pairs: int = 24, seed: int = 0) -> Memory:
    """Keys whose target is a fixed function of the key, so an adapter can learn it."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 6, (pairs,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    keys = torch.randn(int(offsets[-1]), D, generator=g)
    targets = (keys[:, :4].argmax(1) * 7 % V).int()
    return Memory(MemorySpec("r", "f", "t", "teacher-forced"), keys, targets, offsets)


def config(**changes: object) -> AdapterConfig:
    base = dict(
        hidden_size=D, rank=4, alpha=4.0, dropout=0.0, variant="residual", key_norm="rms", kappa=0.0
    )
    return AdapterConfig(**{**base, **changes})  # type: ignore[arg-type]


def test_pema_dp_reports_epsilon_within_target_and_trains() -> None:
    head, memory = tiny_head(), tiny_memory()
    adapter = PemaAdapter(config())
    cfg = TrainConfig(lr=1e-2, epochs=3, dp_epsilon=3.0, dp_max_grad_norm=1.0, dp_batch_pairs=6)
    report = train_adapter(adapter, head, memory, tiny_memory(8, seed=1), cfg)
    assert report.privacy is not None
    assert report.privacy["unit"] == "pair" and report.privacy["n"] == 24
    assert report.privacy["target_delta"] == 1 / 48
    assert 0 < float(report.privacy["epsilon_spent"]) <= 3.0
    assert float(report.privacy["noise_multiplier"]) > 0
    assert not torch.equal(adapter.B_pd, torch.zeros_like(adapter.B_pd))


def test_pema_per_pair_gradients_are_exact_and_clipped() -> None:
    """Opacus' per-sample gradients of the PEMA core equal per-pair gradients computed one pair
    at a time, and clipping bounds each pair's contribution."""
    head, memory = tiny_head(), tiny_memory()
    adapter = PemaAdapter(config())
    with torch.no_grad():
        adapter.B_pd.normal_()
    core = _AdapterCore(adapter)
    optimizer = torch.optim.SGD([adapter.A, adapter.B_pd], lr=0.1)
    clip = 1e-3
    _, dp_opt, _, _ = _engine_setup(core, optimizer, 24, 6, 8.0, 1, clip)
    pairs = torch.arange(5)
    plain = _AdapterCore(adapter)  # same parameters, no Opacus hooks: the one-pair reference
    expected = []
    for i in range(len(pairs)):
        k, t, _ = _pair_batch(memory, pairs[i : i + 1])
        expected.append(
            torch.autograd.grad(_per_pair_ce(head, plain(adapter.prepare(k)), t), adapter.B_pd)[0]
        )
    keys, targets, _ = _pair_batch(memory, pairs)
    loss = _per_pair_ce(head, core(adapter.prepare(keys)), targets) / len(pairs)
    loss.backward()
    per_sample = adapter.B_pd.grad_sample  # type: ignore[attr-defined]
    for i in range(len(pairs)):
        torch.testing.assert_close(per_sample[i], expected[i], rtol=1e-4, atol=1e-6)
    assert float(per_sample.flatten(1).norm(dim=1).min()) > clip  # so clipping must act
    dp_opt.clip_and_accumulate()
    total = torch.cat([adapter.A.summed_grad.flatten(), adapter.B_pd.summed_grad.flatten()])  # type: ignore[attr-defined]
    assert float(total.norm()) <= len(pairs) * clip * (1 + 1e-4)


def test_shift_peer_dp_clips_and_reports_epsilon() -> None:
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    fmt = PromptFormat(tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        )
    )  # fmt: skip
    pairs = [Pair(f"Verse {i} of the old text.", f"Verse {i}, in modern words.") for i in range(12)]
    items = encode_pairs(fmt, pairs, 64)
    peer = ShiftPeer(model, "jrwarp", k=32)
    w = peer.W.clone()
    report = train_peer_private(
        peer, items, SFTConfig(lr=1e-2, batch_size=4, epochs=2), 0, 8.0, 0.5
    )
    assert report.privacy is not None and 0 < float(report.privacy["epsilon_spent"]) <= 8.0
    assert report.privacy["target_delta"] == 1 / 24
    assert torch.equal(peer.W, w)
    # Per-sample gradients of z exist for every pair of a batch and get clipped to C.
    peer2 = ShiftPeer(model, "slash", k=32)
    opt = torch.optim.SGD(peer2.trainable(), lr=0.1)
    clip = 1e-4
    _, dp_opt, _, _ = _engine_setup(peer2, opt, 12, 4, 8.0, 1, clip)
    peer2.train()
    peer2.per_sample_loss(collate(items[:3], 0)).mean().backward()
    z = peer2.z_source.z
    assert tuple(z.grad_sample.shape) == (3, 32)  # type: ignore[attr-defined]
    assert float(z.grad_sample.norm(dim=1).min()) > clip  # type: ignore[attr-defined]
    dp_opt.clip_and_accumulate()
    assert float(z.summed_grad.norm()) <= 3 * clip * (1 + 1e-4)  # type: ignore[attr-defined]


def test_pema_mix_trains_copies_and_serves_their_average(tmp_path: object) -> None:
    head, memory = tiny_head(), tiny_memory()
    adapter = PemaAdapter(config(mixture=3, dropout=0.2))
    assert adapter.A_mix is not None
    assert all(torch.equal(adapter.A_mix[i], adapter.A) for i in range(3))  # identical init
    before = train_adapter(adapter, head, memory, tiny_memory(8, 1), TrainConfig(epochs=0)).valid
    report = train_adapter(
        adapter, head, memory, tiny_memory(8, 1), TrainConfig(lr=1e-2, batch_size=16, epochs=6)
    )
    assert report.valid["ce"] < before["ce"]
    copies = adapter.A_mix.detach()
    assert not torch.equal(copies[0], copies[1])  # random routing trained them differently
    adapter.eval()
    x = adapter.prepare(memory.keys[:5])
    averaged = PemaAdapter(config(dropout=0.2))
    averaged.load_state_dict({**averaged.state_dict(), "A": copies.mean(0), "B_pd": adapter.B_pd})
    averaged.eval()
    torch.testing.assert_close(adapter.predict_hidden(x), averaged.predict_hidden(x))
    torch.testing.assert_close(adapter.inference_state()["A"], copies.mean(0))
    out = save_adapter(adapter, tmp_path / "mix")  # type: ignore[operator]
    loaded, _ = load_adapter(out)
    assert loaded.config.mixture == 3
    torch.testing.assert_close(loaded.A, copies.mean(0))
    torch.testing.assert_close(loaded.predict_hidden(x), averaged.predict_hidden(x))
