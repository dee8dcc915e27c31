"""The frozen model as a source of last-layer hidden states taken *before* the final norm.

Two ways to read them: `encode` (memory building, teacher-forced or free-running) and a
`DecodeSession` (one hidden state per sequence per step, with a KV cache), which is the small
"next hidden state" interface that generation runs against, locally or through the coordinator.

Several local sessions can be stepped in one forward pass (`FrozenLM.step_sessions`): their KV
caches are left-padded to a common length and stacked into one cache (a `_DecodeGroup`), with the
attention mask hiding the padding and position ids counting real tokens only, so every row sees
exactly what it would see alone. The group is kept while the same sessions keep stepping together;
when the set changes, each member's rows are cut back out and a new group is stacked.

Whatever device the model sits on, tensors cross this module's API on the CPU in fp32.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from pema.errors import DataError, ModelError
from pema.head import HeadSpec, LMHead, find_final_norm
from pema.settings import MemoryMode


@dataclass(frozen=True)
class EncodeItem:
    """One training pair as token ids: keys are taken for every target token."""

    prompt: Sequence[int]
    target: Sequence[int]


@dataclass
class Encoded:
    keys: Tensor  # T x d, float32 values of the model's pre-norm states
    generated: list[int] | None  # the model's own greedy tokens (free-running mode only)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    revision: str
    hidden_size: int
    vocab_size: int
    max_length: int
    dtype: str
    norm_kind: str


class DecodeSession(Protocol):
    """Greedy decoding one token at a time; every call returns f(c) (B x d, fp32) per sequence."""

    def start(self, prompts: Sequence[Sequence[int]]) -> Tensor: ...

    def step(self, tokens: Sequence[int]) -> Tensor: ...

    def close(self) -> None: ...


class Backbone(Protocol):
    """What a tenant needs of the frozen model: metadata, the head, keys, and decoding."""

    info: ModelInfo

    def head(self) -> LMHead: ...

    def encode(
        self,
        items: Sequence[EncodeItem],
        mode: MemoryMode,
        progress: Callable[[int], None] | None = None,
    ) -> list[Encoded]: ...

    def session(self) -> DecodeSession: ...


def token_batches(
    lengths: Sequence[int], max_batch_tokens: int, max_batch_size: int = 64
) -> Iterator[list[int]]:
    """Indices grouped by similar length so that (rows x longest row) stays under the budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        longest = lengths[batch[0]] if batch else lengths[i]
        if batch and (
            (len(batch) + 1) * longest > max_batch_tokens or len(batch) >= max_batch_size
        ):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Token ids left-padded to a rectangle, and the attention mask (1 on real tokens)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def positions_from_mask(mask: Tensor) -> Tensor:
    """Positions that count real tokens only, so a left-padded row sees the same as alone."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


class FrozenLM:
    """A frozen causal LM whose final norm is lifted out into the head.

    The model's own final norm is replaced by identity, so the base model returns pre-norm states;
    the norm lives on in `head()`, so nothing about the model's distribution is lost.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        name: str,
        revision: str,
        max_batch_tokens: int = 4096,
    ) -> None:
        self.head_spec = HeadSpec.from_model(model)
        path, _ = find_final_norm(model)
        prefix, _, attr = path.rpartition(".")
        base = model.get_submodule(prefix) if prefix else model
        setattr(base, attr, nn.Identity())
        self.model = model
        self.base = model.base_model
        self.device = next(model.parameters()).device
        self.max_batch_tokens = max_batch_tokens
        # Stacking caches is right only for plain full-attention layers (sliding windows or
        # linear-attention states would need per-row offsets): other models step sessions alone.
        probe = DynamicCache(config=model.config)
        self.batchable_decode = all(type(layer) is DynamicLayer for layer in probe.layers)
        config = model.config
        max_length: int = (
            getattr(config, "max_position_embeddings", None)
            or getattr(config, "n_positions", None)
            or 2048
        )
        self.info = ModelInfo(
            name=name,
            revision=revision,
            hidden_size=self.head_spec.weight.shape[1],
            vocab_size=self.head_spec.weight.shape[0],
            max_length=max_length,
            dtype=str(model.dtype).removeprefix("torch."),
            norm_kind=self.head_spec.norm_kind,
        )
        self._head: LMHead | None = None

    def head(self) -> LMHead:
        if self._head is None:
            self._head = LMHead(self.head_spec)
        return self._head

    def validate_ids(self, ids: Sequence[int], what: str) -> None:
        if not ids:
            raise DataError(f"{what} is empty")
        bad = [t for t in ids if not 0 <= t < self.info.vocab_size]
        if bad:
            raise DataError(
                f"{what} has token id {bad[0]} outside the vocabulary [0, {self.info.vocab_size})"
            )

    def _check_item(self, item: EncodeItem, index: int) -> None:
        self.validate_ids(item.prompt, f"item {index}: prompt")
        self.validate_ids(item.target, f"item {index}: target")
        total = len(item.prompt) + len(item.target)
        if total > self.info.max_length:
            raise DataError(
                f"item {index}: {total} tokens exceed the model's limit of {self.info.max_length}"
            )

    @torch.inference_mode()
    def forward_padded(
        self,
        seqs: Sequence[Sequence[int]],
        cache: DynamicCache | None = None,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, DynamicCache, Tensor]:
        """Left-padded forward pass: returns pre-norm states (B x L x d), the cache, the mask."""
        ids, new_mask = left_pad(seqs)
        ids, new_mask = ids.to(self.device), new_mask.to(self.device)
        mask = new_mask if attention_mask is None else torch.cat([attention_mask, new_mask], dim=1)
        positions = positions_from_mask(mask)[:, -ids.shape[1] :]
        cache = cache if cache is not None else DynamicCache(config=self.model.config)
        out = self.base(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
        return out.last_hidden_state, out.cache, mask

    def encode(
        self,
        items: Sequence[EncodeItem],
        mode: MemoryMode,
        progress: Callable[[int], None] | None = None,
    ) -> list[Encoded]:
        """Keys for every target token of every item, in the items' order."""
        for i, item in enumerate(items):
            self._check_item(item, i)
        results: list[Encoded | None] = [None] * len(items)
        lengths = [len(it.prompt) + len(it.target) for it in items]
        for batch in token_batches(lengths, self.max_batch_tokens):
            chunk = [items[i] for i in batch]
            encoded = (
                self._teacher_forced(chunk)
                if mode == MemoryMode.TEACHER_FORCED
                else self._free_running(chunk)
            )
            for i, e in zip(batch, encoded, strict=True):
                results[i] = e
            if progress is not None:
                progress(len(batch))
        return [r for r in results if r is not None]

    def _teacher_forced(self, items: Sequence[EncodeItem]) -> list[Encoded]:
        # Key t is the state after prompt + y_<t; the last target token is never an input.
        seqs = [list(it.prompt) + list(it.target[:-1]) for it in items]
        hidden, _, _ = self.forward_padded(seqs)
        return [
            Encoded(keys=host_fp32(hidden[i, hidden.shape[1] - len(it.target) :]), generated=None)
            for i, it in enumerate(items)
        ]

    def _free_running(self, items: Sequence[EncodeItem]) -> list[Encoded]:
        steps = max(len(it.target) for it in items)
        # Every row decodes for the longest target: split a batch whose padded width would pass
        # the model's limit (each item alone fits, as encode checked).
        width = max(len(it.prompt) for it in items) + steps - 1
        if len(items) > 1 and width > self.info.max_length:
            half = len(items) // 2
            return self._free_running(items[:half]) + self._free_running(items[half:])
        session = LocalSession(self)
        keys = torch.empty(len(items), steps, self.info.hidden_size)
        generated = torch.empty(len(items), steps, dtype=torch.long)
        h = session.start([it.prompt for it in items])
        head = self.head()
        for t in range(steps):
            keys[:, t] = h
            with torch.inference_mode():
                generated[:, t] = head(h).argmax(-1)
            if t + 1 < steps:
                # Rows whose target is shorter keep decoding, but their extra states are dropped.
                h = session.step(generated[:, t].tolist())
        session.close()
        return [
            Encoded(
                keys=keys[i, : len(it.target)].clone(),
                generated=generated[i, : len(it.target)].tolist(),
            )
            for i, it in enumerate(items)
        ]

    def session(self) -> LocalSession:
        return LocalSession(self)

    @torch.inference_mode()
    def step_sessions(self, steps: Sequence[tuple[LocalSession, Sequence[int]]]) -> list[Tensor]:
        """One decode step of several sessions in one forward pass: each gets f(c) (rows x d,
        fp32, CPU) exactly as if it had stepped alone (up to float rounding)."""
        if not steps:
            return []
        sessions = [s for s, _ in steps]
        if len({id(s) for s in sessions}) != len(sessions):
            raise ModelError("a session can take only one step per batch")
        if len(sessions) > 1 and not self.batchable_decode:
            raise ModelError(f"{type(self.model).__name__}: decode sessions step one at a time")
        for session, tokens in steps:
            session.check_step(tokens)
        group = _DecodeGroup.of(self, sessions)
        hidden, group.cache, group.mask = self.forward_padded(
            [[t] for _, tokens in steps for t in tokens], group.cache, group.mask
        )
        last = host_fp32(hidden[:, -1])
        for session in sessions:
            session.length += 1
        return [last[s.rows_slice] for s in sessions]


def host_fp32(t: Tensor) -> Tensor:
    """An fp32 CPU tensor that owns its memory (never a view into a model's buffers)."""
    return t.to("cpu", torch.float32, copy=True)


class _DecodeGroup:
    """The stacked KV cache and mask of sessions that step together (rows in members' order).

    Members are held weakly, so a group never keeps a closed session's object alive; a group is
    only ever stepped while its exact member list steps, and is read-only once superseded."""

    def __init__(self, members: Sequence[LocalSession], cache: DynamicCache, mask: Tensor) -> None:
        self.members = [weakref.ref(s) for s in members]
        self.cache = cache
        self.mask = mask

    @classmethod
    def of(cls, lm: FrozenLM, sessions: Sequence[LocalSession]) -> _DecodeGroup:
        """The sessions' current group when they are exactly its members, else a new one."""
        current = sessions[0].group
        if current is not None and [m() for m in current.members] == list(sessions):
            return current
        parts = [s.own_state() for s in sessions]
        width = max(mask.shape[1] for _, mask in parts)

        def pad(t: Tensor, dim: int) -> Tensor:
            missing = width - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        layers = [
            (
                torch.cat([pad(kv[i][0], 2) for kv, _ in parts]),
                torch.cat([pad(kv[i][1], 2) for kv, _ in parts]),
            )
            for i in range(len(parts[0][0]))
        ]
        mask = torch.cat([pad(m, 1) for _, m in parts])
        group = cls(sessions, DynamicCache(layers, config=lm.model.config), mask)
        row = 0
        for s, (_, m) in zip(sessions, parts, strict=True):
            s.join(group, slice(row, row + m.shape[0]))
            row += m.shape[0]
        return group


class LocalSession:
    """An in-process DecodeSession over a FrozenLM: its KV cache lives in a decode group (its own
    until it steps together with other sessions)."""

    def __init__(self, lm: FrozenLM) -> None:
        self.lm = lm
        self.group: _DecodeGroup | None = None
        self.rows_slice = slice(0, 0)
        self.length = 0
        # Set from any thread; the model's thread drops the cache the next time it groups.
        self.closed = False

    @property
    def rows(self) -> int:
        return self.rows_slice.stop - self.rows_slice.start

    def join(self, group: _DecodeGroup, rows: slice) -> None:
        self.group, self.rows_slice = group, rows

    def own_state(self) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
        """This session's rows of its group's cache (per layer: keys, values) and mask, without
        the leading columns that are padding for all of its rows."""
        if self.group is None:
            raise ModelError("session not started")
        g, r = self.group, self.rows_slice
        mask = g.mask[r]
        lead = int((mask.sum(0) == 0).long().cumprod(0).sum())
        kv = []
        for layer in g.cache.layers:
            if not isinstance(layer, DynamicLayer) or layer.keys is None or layer.values is None:
                raise ModelError(f"cannot regroup a {type(layer).__name__} cache")
            kv.append((layer.keys[r, :, lead:], layer.values[r, :, lead:]))
        return kv, mask[:, lead:]

    def start(self, prompts: Sequence[Sequence[int]]) -> Tensor:
        if self.group is not None or self.closed:
            raise ModelError("session already started")
        if not prompts:
            raise DataError("no prompts")
        for i, p in enumerate(prompts):
            self.lm.validate_ids(p, f"prompt {i}")
        length = max(len(p) for p in prompts)
        if length > self.lm.info.max_length:
            raise DataError(f"prompt of {length} tokens exceeds the model's limit")
        hidden, cache, mask = self.lm.forward_padded(prompts)
        self.join(_DecodeGroup([self], cache, mask), slice(0, len(prompts)))
        self.length = length
        return host_fp32(hidden[:, -1])

    def check_step(self, tokens: Sequence[int]) -> None:
        """Refuse a step this session cannot take, before it joins a batch."""
        if self.group is None or self.closed:
            raise ModelError("session not started" if not self.closed else "session closed")
        if len(tokens) != self.rows:
            raise DataError(f"expected {self.rows} tokens, got {len(tokens)}")
        self.lm.validate_ids(tokens, "step tokens")
        if self.length + 1 > self.lm.info.max_length:
            raise DataError(
                f"sequence reached the model's limit of {self.lm.info.max_length} tokens"
            )

    def step(self, tokens: Sequence[int]) -> Tensor:
        (hidden,) = self.lm.step_sessions([(self, tokens)])
        return hidden

    def close(self) -> None:
        self.closed = True
