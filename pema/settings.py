"""Names, choices and defaults the command lines need to parse and validate their arguments.

This module imports nothing heavy (no torch, no transformers): `pema-tenant --help` and every
argument error answer at once, and the model is loaded only once the arguments are known good.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "pema-service"
CACHE_ENV = "PEMA_CACHE_DIR"

VARIANTS = ("faithful", "residual")
KEY_NORMS = ("raw", "rms")
SCHEDULES = ("gu", "constant")
DTYPE_NAMES = ("auto", "bfloat16", "float32", "float16")
DEFAULT_TEMPLATE = "Rewrite in modern English:\n{source}"
DEFAULT_TARGETS = ("q_proj", "v_proj")  # the LoRA paper's choice; configurable everywhere


@dataclass(frozen=True)
class PriorChoice:
    """Choose the source priors (β: the bag of source tokens, γ: the copy pointer) per tenant, on
    its own valid pairs, before training: greedy outputs of the first `pairs` valid pairs with
    each grid (β, γ) ((0, 0): the model's own output; else the untrained adapter with those
    priors, at λ 1), the best chrF wins (ties: the smaller β + γ). The priors help where outputs
    reuse the source (rewriting: kjv_web) and hurt where they do not (translation: web_es).
    Teacher-forced CE cannot make this choice: on kjv_web it is lowest at β 1, where generation
    wants 3 to 5 (README). With a prior on, λ becomes `lambda_with_prior`: the priors live in
    the adapter's distribution only."""

    grid: tuple[tuple[float, float], ...] = ((0.0, 0.0), (3.0, 0.0), (0.0, 4.0))
    pairs: int = 32
    lambda_with_prior: float = 1.0


def prior_label(beta: float, gamma: float) -> str:
    """How reports and summaries name a (β, γ) of the source priors."""
    return f"β {beta:g} γ {gamma:g}"


class MemoryMode(StrEnum):
    FREE_RUNNING = "free-running"
    TEACHER_FORCED = "teacher-forced"


def cache_dir() -> Path:
    """Where converted models and on-disk caches live: $PEMA_CACHE_DIR or ~/.cache/pema."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pema"


def version() -> str:
    """The installed distribution's version (a source checkout without install: "unknown")."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


# A saved adapter: peft's file names, and the format this version writes (1: adapter.json +
# adapter.safetensors, still read).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FORMAT_VERSION = 2
LEGACY_ADAPTER_FILES = ("adapter.json", "adapter.safetensors")
