"""PromptFormat: where targets end and generation stops, for SmolLM2's chat format (its end of
turn is its eos), Gemma's (<end_of_turn> is not its eos) and a tokenizer without a template."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_model import make_tiny_gemma3
from torch import nn
from transformers import AutoTokenizer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from pema.backbone import FrozenLM
from pema.data import Pair
from pema.generation import generate
from pema.prompts import PromptFormat

# Gemma 3's chat format, reduced to what PromptFormat renders.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@pytest.fixture
def gemma_style(default_model_path: Path) -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer speaking Gemma's chat format, whose end of turn is not the eos."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    tokenizer.add_tokens(["<start_of_turn>", "<end_of_turn>"], special_tokens=True)
    tokenizer.chat_template = GEMMA_TEMPLATE
    return tokenizer


def test_smollm2_targets_end_with_its_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    fmt = PromptFormat(tokenizer)
    assert fmt.eos_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fmt.target_ids("Amen.")[-1] == fmt.eos_id


def test_gemma_format_ends_targets_and_generation_at_end_of_turn(
    gemma_style: PreTrainedTokenizerBase,
) -> None:
    fmt = PromptFormat(gemma_style, "Rewrite in modern English:\n{source}")
    end = gemma_style.convert_tokens_to_ids("<end_of_turn>")
    assert fmt.eos_id == end != gemma_style.eos_token_id
    assert {end, gemma_style.eos_token_id} <= fmt.stop_ids
    prompt = gemma_style.decode(fmt.prompt_ids("Let there be light."))
    assert prompt.endswith("<start_of_turn>user\nRewrite in modern English:\nLet there be "
                           "light.<end_of_turn>\n<start_of_turn>model\n")  # fmt: skip
    (item,) = fmt.items([Pair("Let there be light.", "Let there be light.")])
    assert item.target[-1] == end and fmt.prior_ids("Light.")[-1] == end
    assert fmt.decode(item.target) == "Let there be light."

    # A tiny Gemma3 whose head always prefers <end_of_turn>: generation stops there at once.
    model = make_tiny_gemma3(vocab_size=len(gemma_style))
    model.lm_head = nn.Linear(32, len(gemma_style), bias=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
        model.lm_head.bias.zero_()
        model.lm_head.bias[end] = 100.0
    lm = FrozenLM(model, "tiny-gemma3", "rev")
    (out,) = generate(lm.session(), lm.head(), [item.prompt], fmt.stop_ids, [10])
    assert out == []


def test_without_a_chat_template_the_prompt_is_plain_text(
    gemma_style: PreTrainedTokenizerBase,
) -> None:
    gemma_style.chat_template = None
    fmt = PromptFormat(gemma_style, "Q: {source}")
    assert fmt.eos_id == gemma_style.eos_token_id
    assert fmt.prompt_ids("hi") == gemma_style.encode("Q: hi\n", add_special_tokens=True)
