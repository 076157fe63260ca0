"""Dialogue → token ids, shared by serve (numpy only), teacher and trainer.

The current user turn is the first sequence; the turns before it, oldest
first, are the second. When the pair is too long the context is truncated
from its start, so the oldest turns go first and the current turn survives.

A dialogue arrives again with every turn of its conversation, one turn longer. Where
the tokenizer allows it (:func:`~stream_distill.models.pairs.splits_at_whitespace`,
true for BERT's), an encoder keeps the ids of the last :data:`CACHE_TURNS` turn texts it
encoded and builds the context from them, so each turn is tokenised about once per
conversation instead of once per later request; the ids are exactly those of the joined
text. The pair's special tokens come from the tokenizer's own template
(:func:`~stream_distill.models.pairs.learn_template`), and a BERT tokenizer's words
keep their ids too (:mod:`~stream_distill.models.wordpiece`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from stream_distill.events import Turn
from stream_distill.models.pairs import (
    Ids,
    PairTemplate,
    learn_template,
    splits_at_whitespace,
    tokenizer_spec,
)
from stream_distill.models.wordpiece import WordIds

IntArray = npt.NDArray[np.int64]

CONTEXT_TURNS = 4
CONTEXT_SEPARATOR = " | "
CACHE_TURNS = 16384
"""Turn texts whose ids an encoder keeps (a few hundred bytes each)."""


def split_dialogue(turns: Sequence[Turn]) -> tuple[str, str]:
    """(current user turn, preceding turns joined oldest first)."""
    if not turns:
        raise ValueError("a dialogue needs at least one turn")
    current = turns[-1].text
    context = [f"{t.role}: {t.text}" for t in turns[:-1][-CONTEXT_TURNS:]]
    return current, CONTEXT_SEPARATOR.join(context)


@dataclass(frozen=True, slots=True)
class Batch:
    """Model inputs for a batch of dialogues (numpy, int64, padded to the longest)."""

    input_ids: IntArray
    attention_mask: IntArray
    token_type_ids: IntArray

    def as_feed(self) -> dict[str, IntArray]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "token_type_ids": self.token_type_ids,
        }


class TextEncoder:
    """A fast (Rust) tokenizer configured for our dialogue pairs; thread-safe."""

    def __init__(
        self, tokenizer: Tokenizer, max_length: int = 64, cache_turns: int = CACHE_TURNS
    ) -> None:
        self.max_length = max_length
        self._tok = tokenizer
        # Only when set: a tokenizer shared by several encoders must not be mutated while
        # another thread encodes with it.
        if tokenizer.padding is not None:
            tokenizer.no_padding()
        if tokenizer.truncation is not None:
            tokenizer.no_truncation()
        self._pad_id = tokenizer.token_to_id("[PAD]") or 0
        self._template: PairTemplate | None = learn_template(tokenizer)
        spec = tokenizer_spec(tokenizer)
        self._cache_turns = cache_turns if splits_at_whitespace(tokenizer, spec) else 0
        self._turns: dict[str, Ids] = {}
        """Ids of recent turn texts, oldest first (dict order)."""
        self._roles: dict[str, Ids] = {}
        self._words = WordIds.of(tokenizer, spec) if cache_turns > 0 else None
        self._separator = self._ids(CONTEXT_SEPARATOR)

    @classmethod
    def from_file(cls, path: str | Path, max_length: int = 64) -> TextEncoder:
        return cls(Tokenizer.from_file(str(path)), max_length)

    def to_str(self) -> str:
        return self._tok.to_str()

    @property
    def caches_turns(self) -> bool:
        return self._template is not None and self._cache_turns > 0

    def _ids(self, text: str) -> Ids:
        if self._words is not None and (ids := self._words.ids(text)) is not None:
            return ids
        return tuple(self._tok.encode(text, add_special_tokens=False).ids)

    def _turn(self, text: str) -> Ids:
        """The ids of one turn's text, from the cache when it was seen lately."""
        ids = self._turns.get(text)
        if ids is None:
            ids = self._ids(text)
            turns = self._turns
            turns[text] = ids
            if len(turns) > self._cache_turns:  # the oldest goes (another thread may race)
                turns.pop(next(iter(turns)), None)
        return ids

    def _role(self, role: str) -> Ids:
        ids = self._roles.get(role)
        if ids is None:
            ids = self._roles[role] = self._ids(f"{role}:")
        return ids

    def _pair(self, turns: Sequence[Turn]) -> tuple[Ids, Ids]:
        """Ids of the current turn and of the context before it (both without specials)."""
        if not turns:
            raise ValueError("a dialogue needs at least one turn")
        if not self.caches_turns:
            current, joined = split_dialogue(turns)
            return self._ids(current), self._ids(joined) if joined else ()
        context: list[int] = []
        for t in turns[:-1][-CONTEXT_TURNS:]:  # "role: text | role: text", turn by turn
            if context:
                context += self._separator
            context += self._role(t.role)
            context += self._turn(t.text)
        return self._turn(turns[-1].text), tuple(context)

    def _encode_one(self, turns: Sequence[Turn]) -> tuple[list[int], list[int]]:
        """Ids and type ids of one dialogue, cut to the budget at token level: the current
        turn keeps its head, the context its tail."""
        template = self._template
        if template is None:
            return self._encode_plain(turns)
        cur, ctx = self._pair(turns)
        single, pair = template.single_specials, template.pair_specials
        if ctx and len(cur) + len(ctx) + pair > self.max_length:
            keep_ctx = self.max_length - pair - min(len(cur), self.max_length - pair)
            ctx = ctx[len(ctx) - keep_ctx :] if keep_ctx > 0 else ()  # no room: no context
        if len(cur) + len(ctx) + (pair if ctx else single) > self.max_length:
            cur = cur[: self.max_length - (pair if ctx else single)]
        return template.build(cur, ctx)

    def _encode_plain(self, turns: Sequence[Turn]) -> tuple[list[int], list[int]]:
        """:meth:`_encode_one` through the tokenizer's own post-processor (no template)."""
        tok = self._tok
        current, context = split_dialogue(turns)
        cur = tok.encode(current, add_special_tokens=False)
        ctx = tok.encode(context, add_special_tokens=False) if context else None
        single, pair = tok.num_special_tokens_to_add(False), tok.num_special_tokens_to_add(True)
        if ctx is not None and len(cur.ids) + len(ctx.ids) + pair > self.max_length:
            keep_ctx = self.max_length - pair - min(len(cur.ids), self.max_length - pair)
            if keep_ctx > 0:
                ctx.truncate(keep_ctx, direction="left")
            else:
                ctx = None
        if ctx is not None and not ctx.ids:
            ctx = None
        specials = single if ctx is None else pair
        n_ctx = len(ctx.ids) if ctx is not None else 0
        if len(cur.ids) + n_ctx + specials > self.max_length:
            cur.truncate(self.max_length - specials)
        enc = tok.post_process(cur, ctx)
        return enc.ids, enc.type_ids

    def encode(self, dialogues: Sequence[Sequence[Turn]]) -> Batch:
        rows = [self._encode_one(d) for d in dialogues]
        if len(rows) == 1:  # the common case at serve time: no padding to do
            one = np.array([rows[0][0]], dtype=np.int64)
            return Batch(one, np.ones_like(one), np.array([rows[0][1]], dtype=np.int64))
        width = max(len(ids) for ids, _ in rows)
        n = len(rows)
        input_ids = np.full((n, width), self._pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64)
        for i, (ids, type_ids) in enumerate(rows):
            k = len(ids)
            input_ids[i, :k] = ids
            mask[i, :k] = 1
            types[i, :k] = type_ids
        return Batch(input_ids, mask, types)

    def encode_texts(self, texts: Sequence[str]) -> Batch:
        return self.encode([[Turn(role="user", text=t)] for t in texts])
