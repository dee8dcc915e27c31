"""Turning (source, target) text into the token ids the model sees."""

from __future__ import annotations

from collections.abc import Sequence

from jinja2 import TemplateError
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from pema.backbone import EncodeItem
from pema.data import Pair
from pema.errors import DataError
from pema.settings import DEFAULT_TEMPLATE

# The task prompts of the evaluation data in ../shared/data, used by the benchmarks and the demo.
TASK_TEMPLATES = {
    "kjv_web": DEFAULT_TEMPLATE,
    "web_es": "Translate to Spanish:\n{source}",
}


def _end_of_turn(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the chat template closes a model turn with: SmolLM2's <|im_end|> (also
    its eos) or Gemma's <end_of_turn> (not its eos: Gemma's eos ends a document, not a turn)."""
    marker = "Amen."
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "?"}, {"role": "assistant", "content": marker}],
            tokenize=False,
        )
    except (TemplateError, ValueError):  # a template that takes no assistant turn
        return None
    _, found, after = str(text).rpartition(marker)
    ids = tokenizer.encode(after, add_special_tokens=False) if found else []
    added = tokenizer.added_tokens_decoder.get(ids[0]) if ids else None
    return ids[0] if added is not None and added.special else None


class PromptFormat:
    """A task template around the source, wrapped in the model's chat template when it has one.

    Targets end with the model's end-of-turn token (`eos_id`: the chat template's, else the
    tokenizer's end of sequence) so an adapter also learns where to stop; generation stops there,
    at the tokenizer's own end of sequence, or at a token that contains a newline.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, template: str = DEFAULT_TEMPLATE
    ) -> None:
        if "{source}" not in template:
            raise DataError(f"template must contain {{source}}: {template!r}")
        try:
            template.format(source="")
        except (KeyError, IndexError, ValueError) as e:
            raise DataError(
                f"template has a stray placeholder or brace: {template!r} ({e})"
            ) from None
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer defines no end-of-sequence token")
        self.tokenizer = tokenizer
        self.template = template
        end = _end_of_turn(tokenizer) if tokenizer.chat_template else None
        self.eos_id = int(tokenizer.eos_token_id) if end is None else end
        self.stop_ids = frozenset(
            {self.eos_id, int(tokenizer.eos_token_id)}
            | {i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])}
        )

    def prompt_ids(self, source: str) -> list[int]:
        text = self.template.format(source=source)
        if self.tokenizer.chat_template:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]  # type: ignore[index]
            return [int(t) for t in ids]  # type: ignore[arg-type]
        return self.tokenizer.encode(text + "\n", add_special_tokens=True)

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def target_ids(self, target: str) -> list[int]:
        return [*self.text_ids(target), self.eos_id]

    def prior_ids(self, source: str) -> list[int]:
        """The support of the source prior: the source's own tokens and the end of turn."""
        return [*self.text_ids(source), self.eos_id]

    def items(self, pairs: Sequence[Pair]) -> list[EncodeItem]:
        return [EncodeItem(self.prompt_ids(p.source), self.target_ids(p.target)) for p in pairs]

    def decode(self, ids: Sequence[int]) -> str:
        text = self.tokenizer.decode(
            [t for t in ids if t not in self.stop_ids], skip_special_tokens=True
        )
        return str(text).strip()
