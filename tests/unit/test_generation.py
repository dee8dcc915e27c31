"""Gradual Unrolling schedule and the log-space mixture of P_LM and P_PEMA (METHODS.md §1)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pema.errors import PemaError
from pema.generation import Mixing, expected_length, gu_lambda, mix_log_probs, token_ratio


def test_gu_check_values() -> None:
    assert gu_lambda(1, 0.9, 50) == pytest.approx(0.9, abs=1e-12)
    assert gu_lambda(2, 0.9, 50) == pytest.approx(0.777924, abs=1e-9)
    assert gu_lambda(26, 0.9, 50) == pytest.approx(0.2025, abs=1e-9)


def test_gu_formula_and_zero_after_length() -> None:
    for t in range(2, 51):
        assert gu_lambda(t, 0.9, 50) == pytest.approx((0.9 * (1 - (t - 1) / 50)) ** 2, abs=1e-12)
    for t in (51, 52, 100, 10_000):
        assert gu_lambda(t, 0.9, 50) == 0.0
    # λ never grows along the sentence.
    values = [gu_lambda(t, 0.9, 50) for t in range(1, 60)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_gu_steps_count_from_one() -> None:
    with pytest.raises(PemaError):
        gu_lambda(0, 0.9, 50)


def test_mixing_constant_schedule_ignores_length() -> None:
    m = Mixing(0.5, "constant")
    assert [m.lam(t, 3) for t in (1, 2, 3, 4, 100)] == [0.5] * 5
    assert Mixing(0.9, "gu").lam(2, 50) == pytest.approx(0.777924, abs=1e-9)


def _random_log_probs(rows: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3, -1)


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5, 0.777924, 0.9, 1.0])
def test_mix_log_probs_equals_direct_mixture(lam: float) -> None:
    lp_lm, lp_pema = _random_log_probs(4, 50, 1), _random_log_probs(4, 50, 2)
    mixed = mix_log_probs(lp_lm, lp_pema, lam)
    direct = torch.log((1 - lam) * lp_lm.exp() + lam * lp_pema.exp())
    torch.testing.assert_close(mixed, direct, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(mixed).all()
    # Still a distribution.
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(4, dtype=torch.float64))


def test_mix_log_probs_endpoints_are_exact() -> None:
    lp_lm, lp_pema = _random_log_probs(3, 20, 3), _random_log_probs(3, 20, 4)
    assert torch.equal(mix_log_probs(lp_lm, lp_pema, 0.0), lp_lm)
    assert torch.equal(mix_log_probs(lp_lm, lp_pema, 1.0), lp_pema)


def test_mix_log_probs_per_row_lambda() -> None:
    lp_lm, lp_pema = _random_log_probs(4, 30, 5), _random_log_probs(4, 30, 6)
    lams = [0.0, 0.25, 0.9, 1.0]
    lam = torch.tensor([[x] for x in lams], dtype=torch.float64)
    mixed = mix_log_probs(lp_lm, lp_pema, lam)
    for i, x in enumerate(lams):
        direct = torch.log((1 - x) * lp_lm[i].exp() + x * lp_pema[i].exp())
        torch.testing.assert_close(mixed[i], direct, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mixed[i], mix_log_probs(lp_lm[i], lp_pema[i], x))


def test_mix_log_probs_float32_rows_with_float32_lambda() -> None:
    # generate() builds λ as a float32 tensor over float32 log-probs.
    lp_lm, lp_pema = _random_log_probs(2, 10, 7).float(), _random_log_probs(2, 10, 8).float()
    lam = torch.tensor([[0.3], [0.8]])
    mixed = mix_log_probs(lp_lm, lp_pema, lam)
    direct = torch.log((1 - lam) * lp_lm.exp() + lam * lp_pema.exp())
    torch.testing.assert_close(mixed, direct, rtol=1e-5, atol=1e-6)


def test_length_estimate_from_source_only() -> None:
    assert token_ratio([10, 20, 30], [12, 20, 60]) == pytest.approx(1.2)
    assert expected_length(10, 1.25) == math.ceil(12.5)
    assert expected_length(0, 1.0) == 1
    with pytest.raises(PemaError):
        token_ratio([], [])
