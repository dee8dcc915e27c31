"""Greedy generation mixing P_LM and P_PEMA with Gradual Unrolling, over any DecodeSession."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pema.adapter import PemaAdapter
from pema.backbone import DecodeSession
from pema.errors import PemaError
from pema.head import LMHead
from pema.source_prior import CopyTracker


def gu_lambda(t: int, lambda_max: float, length: int) -> float:
    """Gradual Unrolling: λ_1 = λ_max, λ_t = (λ_max (1 - (t-1)/L))² for 2 ≤ t ≤ L, else 0."""
    if t < 1:
        raise PemaError(f"generation steps count from 1, got {t}")
    if t == 1:
        return lambda_max
    if t > length:
        return 0.0
    return (lambda_max * (1 - (t - 1) / length)) ** 2


def mix_log_probs(logp_lm: Tensor, logp_pema: Tensor, lam: Tensor | float) -> Tensor:
    """log((1-λ) P_LM + λ P_PEMA), computed in log space (λ may be per row, shape B x 1)."""
    lam_t = torch.as_tensor(lam, dtype=logp_lm.dtype)
    return torch.logaddexp(logp_lm + torch.log1p(-lam_t), logp_pema + torch.log(lam_t))


def token_ratio(source_lengths: Sequence[int], target_lengths: Sequence[int]) -> float:
    """ρ: the median target/source token ratio, from training data only."""
    ratios = [t / s for s, t in zip(source_lengths, target_lengths, strict=True) if s > 0]
    if not ratios:
        raise PemaError("cannot estimate the length ratio from empty data")
    return float(statistics.median(ratios))


def expected_length(source_tokens: int, rho: float) -> int:
    """L for GU, from the source alone (never from a reference)."""
    return max(1, math.ceil(rho * source_tokens))


@dataclass(frozen=True)
class Mixing:
    """How P_PEMA enters: GU from λ_max, or a constant λ = λ_max at every step."""

    lambda_max: float = 0.9
    schedule: str = "gu"

    @classmethod
    def parse(cls, tag: str) -> Mixing:
        """`gu-0.9` or `constant-0.5`: the schedule and λ (λ_max for GU)."""
        schedule, _, lam = tag.partition("-")
        try:
            mixing = cls(float(lam), schedule)
        except ValueError:
            raise PemaError(f"not a mixing (e.g. gu-0.9): {tag!r}") from None
        if schedule not in ("gu", "constant") or not 0 < mixing.lambda_max <= 1:
            raise PemaError(f"not a mixing (e.g. gu-0.9): {tag!r}")
        return mixing

    @property
    def tag(self) -> str:
        """The inverse of parse."""
        return f"{self.schedule}-{self.lambda_max}"

    def lam(self, t: int, length: int) -> float:
        if self.schedule == "constant":
            return self.lambda_max
        return gu_lambda(t, self.lambda_max, length)


def greedy_decode(
    first_scores: Tensor,
    step: Callable[[list[int], int], Tensor],
    stop_ids: frozenset[int],
    max_new_tokens: Sequence[int],
) -> list[list[int]]:
    """The bookkeeping of batched greedy decoding, whatever produces the scores: each row stops
    at a stop token or its own cap. `step(next_ids, t)` returns the scores (B x V) for step t."""
    rows = first_scores.shape[0]
    if rows != len(max_new_tokens):
        raise PemaError("one max_new_tokens per prompt is required")
    out: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    scores, t = first_scores, 1
    while True:
        next_ids = scores.argmax(-1).tolist()
        for i, tok in enumerate(next_ids):
            if done[i]:
                continue
            if tok in stop_ids:
                done[i] = True
                continue
            out[i].append(tok)
            done[i] = len(out[i]) >= max_new_tokens[i]
        if all(done):
            return out
        t += 1
        scores = step(next_ids, t)


@torch.no_grad()
def generate(
    session: DecodeSession,
    head: LMHead,
    prompts: Sequence[Sequence[int]],
    stop_ids: frozenset[int],
    max_new_tokens: Sequence[int],
    adapter: PemaAdapter | None = None,
    mixing: Mixing | None = None,
    lengths: Sequence[int] | None = None,
    sources: Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """Greedy decoding of a batch through a DecodeSession, mixing P_PEMA in when an adapter is
    given. Without an adapter (or with λ = 0) this is the frozen model's own greedy output.
    `sources` (each row's PromptFormat.prior_ids) feed an adapter's source priors."""
    if len(prompts) != len(max_new_tokens):
        raise PemaError("one max_new_tokens per prompt is required")
    if adapter is not None and (mixing is None or lengths is None):
        raise PemaError("mixing an adapter needs a schedule and an expected length per row")
    tracker = None
    if adapter is not None and adapter.has_prior:
        if sources is None or len(sources) != len(prompts):
            raise PemaError("this adapter has a source prior: one source per prompt is needed")
        tracker = CopyTracker(sources, head.vocab_size)

    def scores(h: Tensor, t: int) -> Tensor:
        logp = head.log_probs(h)
        if adapter is not None and mixing is not None and lengths is not None:
            lam = torch.tensor([[mixing.lam(t, n)] for n in lengths])
            if bool((lam > 0).any()):
                prior = None if tracker is None else tracker.prior()
                pema = torch.log_softmax(adapter.logits(head, adapter(h), prior), dim=-1)
                logp = mix_log_probs(logp, pema, lam)
        return logp

    def step(ids: list[int], t: int) -> Tensor:
        if tracker is not None:
            tracker.step(ids)
        return scores(session.step(ids), t)

    try:
        return greedy_decode(
            scores(session.start(prompts), 1),
            step,
            stop_ids,
            max_new_tokens,
        )
    finally:
        session.close()
