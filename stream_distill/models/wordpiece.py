"""Word-level ids in front of a BERT WordPiece tokenizer, for plain ASCII text.

A BERT tokenizer lower-cases, splits at whitespace and around each punctuation mark, then
looks each word up in its WordPiece vocabulary, word by word. The Rust tokenizer redoes
all of that, with offsets and alignments, on every call: about 18 us for a short turn on
this project's machines, several times that right after a model run has pushed it out
of the CPU caches. On plain ASCII text the first two steps are one regular expression,
and the ids of a word never change, so :class:`WordIds` splits the text itself and keeps
each word's ids (asking the Rust tokenizer once per new word): about 2 us a turn.

It answers only where its result is certain to equal the Rust tokenizer's:
:meth:`WordIds.of` returns it for tokenizers made exactly of ``BertNormalizer``,
``BertPreTokenizer`` and ``WordPiece``, and :meth:`WordIds.ids` returns None (the caller
asks the tokenizer) for text with any non-ASCII or control character, or containing an
added token such as ``[SEP]``, which the tokenizer matches before splitting.
"""

from __future__ import annotations

import re
from typing import Any

from tokenizers import Tokenizer

from stream_distill.models.pairs import tokenizer_spec

Ids = tuple[int, ...]

CACHE_WORDS = 65536
"""Distinct words whose ids are kept (a few MB when full)."""

_UNSURE = re.compile(r"[^\t\n\r -~]")
"""Anything but printable ASCII, space, tab and line breaks: the tokenizer decides."""


class WordIds:
    """Ids of ASCII text from its words' cached ids; thread-safe."""

    def __init__(self, tokenizer: Tokenizer, lowercase: bool, added: list[str]) -> None:
        self._tok = tokenizer
        self._lowercase = lowercase
        # BertPreTokenizer: runs of letters and digits; each ASCII punctuation mark alone
        self._split = re.compile(
            r"[a-z0-9]+|[!-/:-@\[-`{-~]" if lowercase else r"[A-Za-z0-9]+|[!-/:-@\[-`{-~]"
        )
        self._added = tuple(a.lower() for a in added if a)
        self._words: dict[str, Ids] = {}

    @classmethod
    def of(cls, tokenizer: Tokenizer, spec: dict[str, Any] | None = None) -> WordIds | None:
        """A word cache for ``tokenizer``, or None when it is not a plain BERT WordPiece one
        (``spec``: its :func:`~stream_distill.models.pairs.tokenizer_spec`, if at hand)."""
        spec = spec if spec is not None else tokenizer_spec(tokenizer)
        norm = spec.get("normalizer") or {}
        pre = spec.get("pre_tokenizer") or {}
        model = spec.get("model") or {}
        if norm.get("type") != "BertNormalizer" or not norm.get("clean_text", False):
            return None
        if pre.get("type") != "BertPreTokenizer" or model.get("type") != "WordPiece":
            return None
        added = [str(t["content"]) for t in spec.get("added_tokens", [])]
        return cls(tokenizer, bool(norm.get("lowercase", True)), added)

    def ids(self, text: str) -> Ids | None:
        """The ids of ``text`` without special tokens, or None when the tokenizer must say."""
        if not text.isascii() or _UNSURE.search(text) is not None:
            return None
        lowered = text.lower()
        if any(a in lowered for a in self._added):
            return None
        out: list[int] = []
        words = self._words
        for word in self._split.findall(lowered if self._lowercase else text):
            ids = words.get(word)
            if ids is None:
                ids = tuple(self._tok.encode(word, add_special_tokens=False).ids)
                words[word] = ids
                if len(words) > CACHE_WORDS:  # the oldest goes (another thread may race)
                    words.pop(next(iter(words)), None)
            out += ids
        return tuple(out)
