"""Dialogue → token ids, shared by serve (numpy only), teacher and trainer.

The current user turn is the first sequence; the turns before it, oldest
first, are the second. When the pair is too long the context is truncated
from its start, so the oldest turns go first and the current turn survives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Encoding, Tokenizer

from stream_distill.events import Turn

IntArray = npt.NDArray[np.int64]

CONTEXT_TURNS = 4


def split_dialogue(turns: Sequence[Turn]) -> tuple[str, str]:
    """(current user turn, preceding turns joined oldest first)."""
    if not turns:
        raise ValueError("a dialogue needs at least one turn")
    current = turns[-1].text
    context = [f"{t.role}: {t.text}" for t in turns[:-1][-CONTEXT_TURNS:]]
    return current, " | ".join(context)


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
    """A fast (Rust) tokenizer configured for our dialogue pairs."""

    def __init__(self, tokenizer: Tokenizer, max_length: int = 64) -> None:
        self.max_length = max_length
        self._tok = tokenizer
        # Only when set: a tokenizer shared by several encoders must not be mutated while
        # another thread encodes with it.
        if tokenizer.padding is not None:
            tokenizer.no_padding()
        if tokenizer.truncation is not None:
            tokenizer.no_truncation()
        self._pad_id = tokenizer.token_to_id("[PAD]") or 0

    @classmethod
    def from_file(cls, path: str | Path, max_length: int = 64) -> TextEncoder:
        return cls(Tokenizer.from_file(str(path)), max_length)

    def to_str(self) -> str:
        return self._tok.to_str()

    def _encode_one(self, current: str, context: str) -> Encoding:
        # Each part once, without special tokens; cut to the budget at token level (the
        # current turn keeps its head, the context its tail); then [CLS] cur [SEP] ctx [SEP].
        tok = self._tok
        cur = tok.encode(current, add_special_tokens=False)
        ctx = tok.encode(context, add_special_tokens=False) if context else None
        n_ctx = len(ctx.ids) if ctx is not None else 0
        specials = 3 if n_ctx else 2
        if len(cur.ids) + n_ctx + specials > self.max_length:
            keep_cur = min(len(cur.ids), self.max_length - specials)
            keep_ctx = self.max_length - specials - keep_cur
            if ctx is not None and keep_ctx > 0:
                ctx.truncate(keep_ctx, direction="left")
            else:  # no room for any context: the current turn alone
                ctx = None
                keep_cur = min(len(cur.ids), self.max_length - 2)
            cur.truncate(keep_cur)
        return tok.post_process(cur, ctx if ctx is not None and ctx.ids else None)

    def encode(self, dialogues: Sequence[Sequence[Turn]]) -> Batch:
        encs = [self._encode_one(*split_dialogue(d)) for d in dialogues]
        width = max(len(e.ids) for e in encs)
        n = len(encs)
        ids = np.full((n, width), self._pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64)
        for i, e in enumerate(encs):
            k = len(e.ids)
            ids[i, :k] = e.ids
            mask[i, :k] = 1
            types[i, :k] = e.type_ids
        return Batch(ids, mask, types)

    def encode_texts(self, texts: Sequence[str]) -> Batch:
        return self.encode([[Turn(role="user", text=t)] for t in texts])
