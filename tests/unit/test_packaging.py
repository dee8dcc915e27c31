"""Packaging and third-party noise: `make setup` and peer runs print no deprecation walls."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_pyproject_applies_without_setuptools_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """setuptools' `project.license` deprecation wall came from a TOML-table license."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(REPO)  # the readme is resolved against the working folder
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), REPO / "pyproject.toml")
    assert [str(w.message) for w in caught] == []


def test_lora_peer_does_not_warn_about_gradient_checkpointing(tiny_model_dir: Path) -> None:
    from pema.models import load_causal_lm
    from pema.peers.lora import lora_peer

    model, _ = load_causal_lm(tiny_model_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora_peer(model, 2, 4)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
