"""Shared fixtures: the real SmolLM2 tokenizer and tiny random models built from a config.

The tokenizer comes from the default model folder; on a clean machine `default_model_dir()`
converts the GGUF once (about 30 s) and caches it, so the session fixture pays that only once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


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


def tiny_llama_config(
    tokenizer: PreTrainedTokenizerBase,
    max_position_embeddings: int = 512,
    vocab_size: int | None = None,
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def make_tiny_llama(
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    max_position_embeddings: int = 512,
    vocab_size: int | None = None,
) -> LlamaForCausalLM:
    """A random 2-layer Llama (hidden 32), fp32, eval mode, over the real tokenizer's vocabulary
    unless a smaller `vocab_size` is asked for (token-id-only tests that want speed)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, max_position_embeddings, vocab_size))
    model.eval()
    model.requires_grad_(False)
    return model


def _save_tiny_folder(
    root: Path, tokenizer: PreTrainedTokenizerBase, max_position_embeddings: int, seed: int
) -> Path:
    model = make_tiny_llama(tokenizer, seed=seed, max_position_embeddings=max_position_embeddings)
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


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
    return _save_tiny_folder(tmp_path_factory.mktemp("tiny") / "tiny-llama", tokenizer, 512, 0)


@pytest.fixture(scope="session")
def short_model_dir(
    tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase
) -> Path:
    """A tiny Llama whose config allows only 64 positions, to provoke over-long sequences."""
    return _save_tiny_folder(tmp_path_factory.mktemp("short") / "tiny-llama-64", tokenizer, 64, 1)
