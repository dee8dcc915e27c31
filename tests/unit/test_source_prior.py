"""The source prior: P_PEMA = softmax(H(h_pd) + β·m), m the row's own source tokens (+ end)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_model import KJV, make_tiny_llama

from pema.adapter import AdapterConfig, PemaAdapter, load_adapter, save_adapter
from pema.backbone import FrozenLM, MemoryMode
from pema.data import read_pairs
from pema.errors import PemaError
from pema.evaluation import pema_decoder, translate_with
from pema.generation import Mixing
from pema.memory import build_memory, memory_spec
from pema.prompts import TASK_TEMPLATES, PromptFormat
from pema.source_prior import (
    NO_COPY,
    CopyTracker,
    SourcePrior,
    advance,
    copy_ids,
    end_tokens,
    next_copy,
    source_mask,
)
from pema.training import TrainConfig, train_adapter


def test_source_mask_marks_each_rows_tokens() -> None:
    mask = source_mask([[1, 3, 3], [0], []], 5)
    assert mask.tolist() == [[0, 1, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]


def test_the_cursor_follows_the_output_through_its_source() -> None:
    source = [10, 11, 12, 11, 13, 2]  # 11 twice; 2 plays end of turn
    # Copying verbatim walks the source in order and ends on end of turn.
    assert copy_ids(source, source) == [10, 11, 12, 11, 13, 2]
    # A repeated token resolves to the occurrence nearest the next position.
    assert advance(source, 2, 11) == 3 and advance(source, -1, 11) == 1
    # A substitution (99 is not in the source) steps one position on, so the copy resumes.
    assert copy_ids(source, [10, 99, 12, 2]) == [10, 11, 12, 11]
    # Skipping ahead jumps the cursor; the end of the source has nothing left to copy.
    assert copy_ids(source, [13, 2]) == [10, 2]
    assert next_copy(source, 5) == NO_COPY


def test_the_tracker_gives_what_training_reads_off_the_gold_prefix() -> None:
    sources = [[5, 6, 7, 1], [8, 9, 1]]
    outputs = [[5, 4, 7, 1], [9, 8, 8, 1]]
    tracker = CopyTracker(sources, 12)
    seen: list[list[int]] = [[], []]
    for step in range(4):
        prior = tracker.prior()
        for row in range(2):
            seen[row].append(int(prior.copy[row]))
        tracker.step([outputs[0][step], outputs[1][step]])
    assert seen == [copy_ids(s, o) for s, o in zip(sources, outputs, strict=True)]
    assert torch.equal(prior.mask, source_mask(sources, 12))


def test_the_copy_prior_adds_gamma_on_the_copy_token_and_holds_the_end_back() -> None:
    adapter = PemaAdapter(
        AdapterConfig(hidden_size=8, rank=2, variant="residual", source_prior=1.5, copy_prior=4.0)
    )
    sources = [[1, 2, 5], [3], [4, 5]]
    prior = SourcePrior(source_mask(sources, 6), torch.tensor([2, NO_COPY, 5]), end_tokens(sources))
    shift = adapter.prior_logits(prior)
    assert isinstance(shift, torch.Tensor)
    assert shift.tolist() == [
        [0, 1.5, 5.5, 0, 0, 1.5 - 4.0],  # mid-source: the end (5) is held back
        [0, 0, 0, 1.5, 0, 0],  # past the end: nothing to copy
        [0, 0, 0, 0, 1.5, 5.5],  # at the end: the copy token is the end
    ]
    with pytest.raises(PemaError, match="source"):
        adapter.prior_logits(None)
    assert PemaAdapter(AdapterConfig(hidden_size=8, rank=2)).prior_logits(None) == 0.0


@pytest.fixture(scope="module")
def setup(tokenizer):
    lm = FrozenLM(make_tiny_llama(tokenizer, seed=2, init_std=0.2), "tiny", "rev")
    fmt = PromptFormat(tokenizer, TASK_TEMPLATES["kjv_web"])
    pairs = read_pairs(KJV / "train.tsv", 12)
    memory = build_memory(
        lm, fmt.items(pairs), memory_spec(lm.info, pairs, fmt.template, MemoryMode.TEACHER_FORCED)
    )
    return lm, fmt, pairs, memory


def test_a_strong_prior_keeps_generation_on_the_source_tokens(setup) -> None:
    lm, fmt, pairs, _ = setup
    sources = [p.source for p in pairs[:4]]
    adapter = PemaAdapter(
        AdapterConfig(hidden_size=32, rank=4, variant="residual", source_prior=40)
    )
    adapter.eval()
    outputs_ids: list[list[int]] = []

    def recording(*args):  # the real PEMA decoder; keeps the ids it returns
        ids = pema_decoder(lm, adapter, Mixing(1.0, "constant"))(*args)
        outputs_ids.extend(ids)
        return ids

    translate_with(recording, fmt, sources, 1.0, 2)
    allowed = {t for s in sources for t in fmt.prior_ids(s)}
    generated = {t for row in outputs_ids for t in row}
    assert generated and generated <= allowed
    # The untuned random model wanders off the source; the prior is what keeps it there.
    plain: list[list[int]] = []
    translate_with(
        lambda *a: plain.extend(pema_decoder(lm)(*a)) or plain[-len(a[0]) :], fmt, sources, 1.0, 2
    )
    assert not {t for row in plain for t in row} <= allowed


def test_training_learns_beta_and_needs_the_sources(setup, tmp_path: Path) -> None:
    lm, fmt, pairs, memory = setup
    head = lm.head()
    cfg = TrainConfig(batch_size=32, epochs=2, eval_every=10**6, lr=1e-2)
    config = AdapterConfig(
        hidden_size=32,
        rank=4,
        variant="residual",
        kappa=0.0,
        source_prior=1.0,
        model_revision="rev",
    )
    adapter = PemaAdapter(config)
    with pytest.raises(PemaError, match="source"):
        train_adapter(adapter, head, memory, memory, cfg)
    ids = [fmt.prior_ids(p.source) for p in pairs]
    report = train_adapter(adapter, head, memory, memory, cfg, sources=(ids, ids))
    assert adapter.source_beta is not None and float(adapter.source_beta.detach()) != 1.0
    # Most gold tokens of this task occur in the source: the prior must lower the CE.
    untrained = PemaAdapter(config.replace(source_prior=0.0))
    from pema.training import evaluate_memory

    assert report.valid["ce"] < evaluate_memory(untrained, head, memory)["ce"]
    save_adapter(adapter, tmp_path / "a")
    loaded, _ = load_adapter(tmp_path / "a", "rev")
    assert loaded.source_beta is not None
    assert torch.equal(loaded.source_beta, adapter.source_beta.detach())


def test_dp_training_keeps_beta_fixed(setup) -> None:
    lm, fmt, pairs, memory = setup
    config = AdapterConfig(
        hidden_size=32, rank=4, variant="residual", kappa=0.0, dropout=0.0, source_prior=2.0
    )
    adapter = PemaAdapter(config)
    ids = [fmt.prior_ids(p.source) for p in pairs]
    cfg = TrainConfig(epochs=1, dp_epsilon=8.0, dp_batch_pairs=4)
    report = train_adapter(adapter, lm.head(), memory, memory, cfg, sources=(ids, ids))
    assert report.privacy is not None
    assert float(adapter.source_beta) == 2.0  # type: ignore[arg-type]


def test_a_fixed_prior_stays_put(setup) -> None:
    lm, fmt, pairs, memory = setup
    config = AdapterConfig(hidden_size=32, rank=4, variant="residual", kappa=0.0, source_prior=2.5)
    adapter = PemaAdapter(config)
    ids = [fmt.prior_ids(p.source) for p in pairs]
    cfg = TrainConfig(batch_size=32, epochs=1, eval_every=10**6, lr=1e-2, learn_source_prior=False)
    train_adapter(adapter, lm.head(), memory, memory, cfg, sources=(ids, ids))
    assert float(adapter.source_beta.detach()) == 2.5  # type: ignore[union-attr]
    assert adapter.B_pd.abs().sum() > 0


def test_priors_are_chosen_on_valid_on_where_outputs_reuse_the_source_off_where_not(
    setup,
) -> None:
    from pema.data import Pair
    from pema.evaluation import choose_source_prior
    from pema.settings import PriorChoice

    lm, fmt, pairs, _ = setup
    config = AdapterConfig(hidden_size=32, rank=4, variant="residual", lambda_max=0.25)
    choice = PriorChoice(grid=((0.0, 0.0), (3.0, 0.0), (0.0, 8.0)), pairs=6)
    # Outputs that copy the source verbatim: the copy prior reproduces them best.
    copying = [Pair(p.source, p.source) for p in pairs]
    chosen, chrf = choose_source_prior(choice, config, lm, fmt, copying)
    assert set(chrf) == set(choice.grid)
    assert chrf[0.0, 8.0] > chrf[3.0, 0.0] > chrf[0.0, 0.0]
    assert (chosen.source_prior, chosen.copy_prior) == (0.0, 8.0)
    assert chosen.lambda_max == choice.lambda_with_prior
    # References with no character of any source: the priors win nothing and stay off.
    foreign = [Pair(p.source, "0123 4567 89") for p in pairs]
    chosen, chrf = choose_source_prior(choice, config, lm, fmt, foreign)
    assert all(c <= chrf[0.0, 0.0] for c in chrf.values())
    assert (chosen.source_prior, chosen.copy_prior, chosen.lambda_max) == (0, 0, 0.25)
    # No valid pair leaves room for its output within the model's limit: nothing to choose on.
    too_long = [Pair(p.source * 400, p.source) for p in pairs]
    chosen, chrf = choose_source_prior(choice, config, lm, fmt, too_long)
    assert chrf == {} and chosen.source_prior == chosen.copy_prior == 0


def test_training_pairs_each_key_with_its_gold_prefixs_copy_token(setup) -> None:
    from pema.training import PriorMasks

    lm, fmt, pairs, memory = setup
    ids = [fmt.prior_ids(p.source) for p in pairs]
    adapter = PemaAdapter(AdapterConfig(hidden_size=32, rank=4, copy_prior=3.0))
    masks = PriorMasks(adapter, lm.head(), memory, ids)
    prior = masks(torch.arange(len(memory)))
    assert prior is not None
    expected = [
        c for p, src in enumerate(ids) for c in copy_ids(src, fmt.target_ids(pairs[p].target))
    ]
    assert prior.copy.tolist() == expected
    # kjv_web rewrites keep much of the source: the copy token is often the gold one.
    hits = (prior.copy == memory.targets.long()).float().mean()
    assert hits > 0.3


def test_a_strong_copy_prior_copies_the_source(setup) -> None:
    lm, fmt, pairs, _ = setup
    sources = [p.source for p in pairs[:4]]
    adapter = PemaAdapter(AdapterConfig(hidden_size=32, rank=4, variant="residual", copy_prior=60))
    adapter.eval()
    outputs = translate_with(
        pema_decoder(lm, adapter, Mixing(1.0, "constant")), fmt, sources, 1.0, 2
    )
    assert outputs == [fmt.decode(fmt.text_ids(s)) for s in sources]


def test_copy_prior_trains_saves_and_loads_and_dp_keeps_it_fixed(setup, tmp_path: Path) -> None:
    lm, fmt, pairs, memory = setup
    ids = [fmt.prior_ids(p.source) for p in pairs]
    config = AdapterConfig(
        hidden_size=32, rank=4, variant="residual", kappa=0.0, dropout=0.0, copy_prior=2.0,
        model_revision="rev",
    )  # fmt: skip
    adapter = PemaAdapter(config)
    cfg = TrainConfig(batch_size=32, epochs=2, eval_every=10**6, lr=1e-2)
    report = train_adapter(adapter, lm.head(), memory, memory, cfg, sources=(ids, ids))
    assert adapter.copy_beta is not None and float(adapter.copy_beta.detach()) != 2.0
    untrained = PemaAdapter(config.replace(copy_prior=0.0))
    from pema.training import evaluate_memory

    assert report.valid["ce"] < evaluate_memory(untrained, lm.head(), memory)["ce"]
    save_adapter(adapter, tmp_path / "a")
    loaded, _ = load_adapter(tmp_path / "a", "rev")
    assert torch.equal(loaded.copy_beta, adapter.copy_beta.detach())  # type: ignore[arg-type]
    dp = PemaAdapter(config)
    dp_cfg = TrainConfig(epochs=1, dp_epsilon=8.0, dp_batch_pairs=4)
    dp_report = train_adapter(dp, lm.head(), memory, memory, dp_cfg, sources=(ids, ids))
    assert dp_report.privacy is not None and float(dp.copy_beta) == 2.0  # type: ignore[arg-type]


def test_the_gate_keeps_a_trained_adapter_only_where_it_clearly_beats_its_start(setup) -> None:
    from pema.data import Pair
    from pema.evaluation import keep_if_better
    from pema.settings import PriorChoice

    lm, fmt, pairs, _ = setup
    copying = [Pair(p.source, p.source) for p in pairs]
    # Stands in for a trained adapter: it copies its sources, far better than the random model.
    copier = PemaAdapter(
        AdapterConfig(hidden_size=32, rank=4, variant="residual", copy_prior=60, lambda_max=1.0)
    )
    copier_state = {k: v.clone() for k, v in copier.state_dict().items()}
    zero_state = {k: torch.zeros_like(v) for k, v in copier.state_dict().items()}
    choice = PriorChoice(pairs=4)
    gate = keep_if_better(choice, copier, zero_state, lm, fmt, copying)
    assert gate["kept"] == "trained" and gate["trained"] > gate["start"] + 20
    assert gate["interval"][0] > 0
    assert float(copier.copy_beta.detach()) == 60  # type: ignore[union-attr]
    # A tie keeps the start: no difference is not a clear gain.
    gate = keep_if_better(choice, copier, copier_state, lm, fmt, copying)
    assert gate["kept"] == "start" and gate["interval"] == [0.0, 0.0]
    # A worse trained adapter: the start is loaded back.
    copier.load_state_dict(zero_state)
    gate = keep_if_better(choice, copier, copier_state, lm, fmt, copying)
    assert gate["kept"] == "start" and gate["interval"][1] < 0
    assert float(copier.copy_beta.detach()) == 60  # type: ignore[union-attr]
