"""Tiny random Llamas (hidden 32, 2 layers) over the default model's real tokenizer: real code
paths in seconds, offline. The one builder for unit and integration tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from pema.data import shared_data_dir
from pema.models import default_model_dir

KJV = shared_data_dir() / "kjv_web"


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
    init_std: float | None = None,
) -> LlamaForCausalLM:
    """A random tiny Llama, fp32, eval mode, over the real tokenizer's vocabulary unless a
    smaller `vocab_size` is asked for (token-id-only tests that want speed). `init_std` redraws
    the matrices larger than the default init, so that greedy choices are not near-ties."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, max_position_embeddings, vocab_size))
    if init_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, init_std)
    model.eval()
    model.requires_grad_(False)
    return model


def save_tiny_model(
    out: Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    seed: int = 0,
    max_position_embeddings: int = 512,
    init_std: float | None = None,
) -> Path:
    """A tiny Llama saved as an ordinary Hugging Face folder with its tokenizer."""
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(default_model_dir())
    model = make_tiny_llama(
        tokenizer, seed, max_position_embeddings=max_position_embeddings, init_std=init_std
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
