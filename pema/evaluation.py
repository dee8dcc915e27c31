"""Generating for a test set and scoring it with sacreBLEU (BLEU and chrF, corpus level)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sacrebleu

from pema.adapter import PemaAdapter
from pema.backbone import Backbone
from pema.generation import Mixing, expected_length, generate
from pema.prompts import PromptFormat


def score(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    refs = [list(references)]
    return {
        "bleu": round(sacrebleu.corpus_bleu(list(hypotheses), refs).score, 2),
        "chrf": round(sacrebleu.corpus_chrf(list(hypotheses), refs).score, 2),
    }


def max_new_tokens(expected: int) -> int:
    """A cap well above the expected length L, so that only runaway outputs are cut."""
    return expected + expected // 2 + 10


def translate(
    backbone: Backbone,
    fmt: PromptFormat,
    sources: Sequence[str],
    adapter: PemaAdapter | None = None,
    mixing: Mixing | None = None,
    rho: float = 1.0,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy outputs for each source, with the adapter mixed in when one is given."""
    head = backbone.head()
    outputs: list[str] = [""] * len(sources)
    # Similar lengths batch together, so few rows idle while the longest finishes.
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        lengths = [expected_length(len(fmt.text_ids(sources[i])), rho) for i in idx]
        ids = generate(
            backbone.session(),
            head,
            [fmt.prompt_ids(sources[i]) for i in idx],
            fmt.stop_ids,
            max_new_tokens=[max_new_tokens(n) for n in lengths],
            adapter=adapter,
            mixing=mixing,
            lengths=lengths,
        )
        for i, row in zip(idx, ids, strict=True):
            outputs[i] = fmt.decode(row)
        if progress:
            progress(len(idx))
    return outputs
