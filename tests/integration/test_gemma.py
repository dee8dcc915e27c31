"""The real Gemma-3-270M (`--model gemma-3-270m`): converted from its GGUF, the lifted head gives
the model's own logits, and a plain-text prompt (the base model has no chat template) decodes to
text that stops. Optional and license-gated: skipped unless `make gemma` installed it."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pema.backbone import FrozenLM
from pema.generation import generate
from pema.models import GEMMA_3_270M, load_causal_lm, model_revision, resolve_model_dir
from pema.prompts import TASK_TEMPLATES, PromptFormat

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec(GEMMA_3_270M.package) is None,
        reason="Gemma-3-270M is optional (Gemma terms): `make gemma` installs it",
    ),
]


def test_gemma_head_reproduces_its_logits_and_greedy_output_stops() -> None:
    model_dir = resolve_model_dir("gemma-3-270m")
    model, tokenizer = load_causal_lm(model_dir, torch.float32, torch.device("cpu"))
    fmt = PromptFormat(tokenizer, TASK_TEMPLATES["kjv_web"])
    assert tokenizer.chat_template is None and fmt.eos_id == tokenizer.eos_token_id
    prompt = fmt.prompt_ids("And God said, Let there be light: and there was light.")
    assert prompt[0] == tokenizer.bos_token_id  # Gemma is lost without its <bos>
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0].float()
    lm = FrozenLM(model, "gemma-3-270m", model_revision(model_dir))
    hidden, _, _ = lm.forward_padded([prompt])
    torch.testing.assert_close(lm.head()(hidden[0]), logits, rtol=1e-5, atol=1e-4)
    (out,) = generate(lm.session(), lm.head(), [prompt], fmt.stop_ids, [40])
    assert 0 < len(out) < 40 and fmt.decode(out)
