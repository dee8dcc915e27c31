"""Tiny random Llamas (hidden 32, 2 layers) over the default model's real tokenizer, and tiny
random Gemma3s over a small vocabulary: real code paths in seconds, offline. The one builder for
unit and integration tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
)
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


def make_tiny_gemma3(
    seed: int = 0,
    vocab_size: int = 300,
    sliding_window: int = 4,
    softcap: float | None = None,
) -> Gemma3ForCausalLM:
    """A random tiny Gemma3 text model, fp32, eval mode: one sliding-window layer (window 4, so
    short test sequences already outgrow it) and one full-attention layer, like the real model's
    mix. Every RMSNorm weight is redrawn around 0, where Gemma's (1 + w) scale differs most from
    Llama's w; `softcap` sets the final logit soft-capping."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=512,
        final_logit_softcapping=softcap,
        tie_word_embeddings=True,
    )
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    model.eval()
    model.requires_grad_(False)
    return model
