"""The source prior: P_PEMA = softmax(H(h_pd) + β·m), m the row's own source tokens (+ end)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_model import KJV, make_tiny_llama

from pema.adapter import AdapterConfig, PemaAdapter, load_adapter, save_adapter, source_mask
from pema.backbone import FrozenLM, MemoryMode
from pema.data import read_pairs
from pema.errors import PemaError
from pema.evaluation import pema_decoder, translate_with
from pema.generation import Mixing
from pema.memory import build_memory, memory_spec
from pema.prompts import TASK_TEMPLATES, PromptFormat
from pema.training import TrainConfig, train_adapter


def test_source_mask_marks_each_rows_tokens() -> None:
    mask = source_mask([[1, 3, 3], [0], []], 5)
    assert mask.tolist() == [[0, 1, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]


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


def test_beta_is_chosen_on_valid_on_where_outputs_reuse_the_source_off_where_not(setup) -> None:
    from pema.data import Pair
    from pema.evaluation import choose_source_prior
    from pema.settings import PriorChoice

    lm, fmt, pairs, _ = setup
    config = AdapterConfig(hidden_size=32, rank=4, variant="residual", lambda_max=0.25)
    choice = PriorChoice(pairs=6)
    # Outputs that copy the source: the prior's outputs are made of the source's tokens.
    copying = [Pair(p.source, p.source) for p in pairs]
    chosen, chrf = choose_source_prior(choice, config, lm, fmt, copying)
    assert set(chrf) == set(choice.grid) and chrf[3.0] > chrf[0.0]
    assert chosen.source_prior == 3.0 and chosen.lambda_max == choice.lambda_with_prior
    # References with no character of any source: the prior wins nothing and stays off.
    foreign = [Pair(p.source, "0123 4567 89") for p in pairs]
    chosen, chrf = choose_source_prior(choice, config, lm, fmt, foreign)
    assert chrf[3.0] <= chrf[0.0] and chosen.source_prior == 0 and chosen.lambda_max == 0.25
    # No valid pair leaves room for its output within the model's limit: nothing to choose on.
    too_long = [Pair(p.source * 400, p.source) for p in pairs]
    chosen, chrf = choose_source_prior(choice, config, lm, fmt, too_long)
    assert chrf == {} and chosen.source_prior == 0
