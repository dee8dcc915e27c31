"""Where a tenant's hidden states come from: the model in this process (or, later, a coordinator)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from pema.backbone import Backbone, FrozenLM
from pema.models import DEFAULT_MODEL_NAME, load_causal_lm, model_revision, resolve_model_dir

# Measured on the 2-core CPU here: bf16 forward passes run about 2x faster than fp32
# (benchmarks/results/quality.md). The head and the adapter always compute in fp32.
DEFAULT_DTYPE = torch.bfloat16


@dataclass
class Backend:
    backbone: Backbone
    tokenizer: PreTrainedTokenizerBase


def local_backend(model: str | Path | None = None, dtype: torch.dtype = DEFAULT_DTYPE) -> Backend:
    """Load the frozen model in this process (the default model when `model` is None)."""
    model_dir = resolve_model_dir(model)
    lm, tokenizer = load_causal_lm(model_dir, dtype)
    name = DEFAULT_MODEL_NAME if model is None else model_dir.name
    return Backend(FrozenLM(lm, name, model_revision(model_dir)), tokenizer)
