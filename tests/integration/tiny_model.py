"""A tiny random Llama folder (hidden 32, 2 layers) with the default model's tokenizer: real code
paths in seconds, offline."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from pema.data import shared_data_dir
from pema.models import cache_dir

TOKENIZER_DIR = cache_dir() / "models" / "SmolLM2-135M-Instruct"
KJV = shared_data_dir() / "kjv_web"


def make_tiny_model(out: Path, seed: int = 0) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
