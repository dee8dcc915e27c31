"""Shared fixtures: the real SmolLM2 tokenizer and tiny random models built from a config.

The tokenizer comes from the default model folder; on a clean machine `default_model_dir()`
converts the GGUF once (about 30 s) and caches it, so the session fixture pays that only once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tiny_model import make_tiny_llama, save_tiny_model
from transformers import AutoTokenizer, LlamaForCausalLM
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# `make test` runs two pytest workers on two cores: every process a test starts (CLIs, servers,
# SuperNodes) taking a torch thread per core would oversubscribe them (OpenMP threads spin while
# they wait for each other).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _deterministic_torch() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from pema.models import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def tokenizer(default_model_path: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(default_model_path)


@pytest.fixture(scope="session")
def make_llama(tokenizer: PreTrainedTokenizerBase):
    """Factory for fresh tiny Llamas: make_llama(seed, max_position_embeddings, vocab_size)."""

    def make(
        seed: int = 0, max_position_embeddings: int = 512, vocab_size: int | None = None
    ) -> LlamaForCausalLM:
        return make_tiny_llama(tokenizer, seed, max_position_embeddings, vocab_size)

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(
    tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase
) -> Path:
    """A tiny Llama saved as an ordinary Hugging Face folder (room for 512 positions)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", tokenizer)


@pytest.fixture(scope="session")
def short_model_dir(
    tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase
) -> Path:
    """A tiny Llama whose config allows only 64 positions, to provoke over-long sequences."""
    return save_tiny_model(
        tmp_path_factory.mktemp("short") / "tiny-llama-64", tokenizer, 1, max_position_embeddings=64
    )
