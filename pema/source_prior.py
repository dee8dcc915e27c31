"""The source priors, extensions beyond the paper that add to P_PEMA's logits what the tenant
already holds, its own source text (nothing more is sent to the model owner):

- the bag prior β·m: m = 1 on every token of the row's source and end of turn;
- the copy prior γ·(e_c - e_end): c is the one source token that continues copying from where
  the output stands in its source, and the end of turn is held back by as much until the copy
  reaches the source's end. Where a rewrite keeps most of its source (kjv_web), the bag prior
  alone lets the output reorder and repeat source words, and a trained adapter ends a verse at
  its first full stop; the copy prior keeps the output in source order to the end and still
  leaves substitutions to the model and the adapter.

Where the output stands is a cursor into the source ids (PromptFormat.prior_ids), moved by each
output token: to that token's occurrence nearest the next source position, or one position on
where the source lacks it (a substitution). Training reads the same rule off the gold prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

NO_COPY = -1  # the cursor has passed the source's end: nothing left to copy
START = -1  # the cursor before any output


def source_mask(rows: Sequence[Sequence[int]], vocab_size: int) -> Tensor:
    """B x V: 1 at each token id of that row's source prior ids, 0 elsewhere."""
    mask = torch.zeros(len(rows), vocab_size)
    lengths = torch.tensor([len(r) for r in rows])
    index = torch.repeat_interleave(torch.arange(len(rows)), lengths)
    mask[index, torch.tensor([t for r in rows for t in r], dtype=torch.long)] = 1.0
    return mask


def end_tokens(sources: Sequence[Sequence[int]]) -> Tensor:
    """B: each row's end token, the last of its source ids (NO_COPY for an empty source)."""
    return torch.tensor([s[-1] if s else NO_COPY for s in sources], dtype=torch.long)


def advance(source: Sequence[int], cursor: int, token: int) -> int:
    """The cursor after the output emits `token`: the occurrence of `token` nearest the next
    source position (ties: the earlier), else the next position."""
    want = cursor + 1
    best = None
    for j, s in enumerate(source):
        if s == token and (best is None or abs(j - want) < abs(best - want)):
            best = j
    return want if best is None else best


def next_copy(source: Sequence[int], cursor: int) -> int:
    """The source token that continues the copy from `cursor` (NO_COPY past the end)."""
    return source[cursor + 1] if 0 <= cursor + 1 < len(source) else NO_COPY


def copy_ids(source: Sequence[int], target: Sequence[int]) -> list[int]:
    """For each position t of a target, the copy prior's token given target[:t]: what training
    pairs with the key of that position."""
    out, cursor = [], START
    for token in target:
        out.append(next_copy(source, cursor))
        cursor = advance(source, cursor, token)
    return out


@dataclass(frozen=True)
class SourcePrior:
    """What the priors need of a batch of rows: the bag mask (B x V), the copy token (B, NO_COPY
    where none) and the end token (B: the last of each row's source ids, its end of turn)."""

    mask: Tensor
    copy: Tensor
    end: Tensor

    def copy_mask(self) -> Tensor:
        """B x V: 1 at each row's copy token, -1 at its end token while the copy token is
        another, 0 elsewhere (all 0 past the source's end)."""
        out = torch.zeros_like(self.mask)
        rows = torch.nonzero(self.copy != NO_COPY).flatten()
        out[rows, self.copy[rows]] = 1.0
        early = rows[self.copy[rows] != self.end[rows]]
        out[early, self.end[early]] = -1.0
        return out


class CopyTracker:
    """The cursors of a batch of generated rows, moved by each step's tokens."""

    def __init__(self, sources: Sequence[Sequence[int]], vocab_size: int) -> None:
        self.sources = [list(s) for s in sources]
        self.cursors = [START] * len(self.sources)
        self.mask = source_mask(self.sources, vocab_size)
        self.end = end_tokens(self.sources)

    def prior(self) -> SourcePrior:
        copy = [next_copy(s, c) for s, c in zip(self.sources, self.cursors, strict=True)]
        return SourcePrior(self.mask, torch.tensor(copy, dtype=torch.long), self.end)

    def step(self, tokens: Sequence[int]) -> None:
        self.cursors = [
            advance(s, c, t) for s, c, t in zip(self.sources, self.cursors, tokens, strict=True)
        ]
