"""What a tokenizer does around a (current turn, context) pair, learnt once from the tokenizer.

:class:`PairTemplate` holds the special tokens a tokenizer's post-processor puts before,
between and after the two sequences (``[CLS] A [SEP] B [SEP]`` for BERT), with their type
ids, so an encoder can assemble a pair from plain token ids instead of building, cutting
and post-processing ``Encoding`` objects for every request. :func:`learn_template` reads
it off the post-processor with probe tokens and returns it only when it reproduces the
post-processor exactly on longer probes.

:func:`splits_at_whitespace` says whether encoding the context turn by turn (and joining
the ids) gives exactly the ids of the joined text: true when normalisation works character
by character and pre-tokenisation never joins across whitespace, as for BERT's WordPiece
tokenizers. Then each turn's ids can be kept and reused on later requests of the
conversation, where that turn is context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tokenizers import Encoding, Tokenizer

Ids = tuple[int, ...]

_PROBES = ("a", "b", "x", "the", "and", "1", "2")
"""Words that encode to a single token in most vocabularies (two distinct ones needed)."""

_LOCAL_NORMALIZERS = frozenset(
    {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents"}
)
_WHITESPACE_PRE_TOKENIZERS = frozenset(
    {"BertPreTokenizer", "Whitespace", "WhitespaceSplit", "Punctuation", "Digits"}
)


@dataclass(frozen=True, slots=True)
class Part:
    """Special tokens at one place of the template, and their type ids."""

    ids: Ids
    type_ids: Ids

    @staticmethod
    def of(enc: Encoding, start: int, stop: int) -> Part:
        return Part(tuple(enc.ids[start:stop]), tuple(enc.type_ids[start:stop]))


@dataclass(frozen=True, slots=True)
class PairTemplate:
    """``single``: before A, after A; ``pair``: before A, between, after B."""

    single: tuple[Part, Part]
    pair: tuple[Part, Part, Part]
    type_a: int
    type_b: int
    type_single: int

    @property
    def single_specials(self) -> int:
        return sum(len(p.ids) for p in self.single)

    @property
    def pair_specials(self) -> int:
        return sum(len(p.ids) for p in self.pair)

    def build(self, a: Ids, b: Ids | None) -> tuple[list[int], list[int]]:
        """Ids and type ids of ``a`` alone (``b`` None or empty) or of the pair."""
        if not b:
            before, after = self.single
            ids = [*before.ids, *a, *after.ids]
            types = [*before.type_ids, *(self.type_single,) * len(a), *after.type_ids]
            return ids, types
        before, between, after = self.pair
        ids = [*before.ids, *a, *between.ids, *b, *after.ids]
        types = [
            *before.type_ids,
            *(self.type_a,) * len(a),
            *between.type_ids,
            *(self.type_b,) * len(b),
            *after.type_ids,
        ]
        return ids, types


def _plain(tok: Tokenizer, text: str) -> Encoding:
    return tok.encode(text, add_special_tokens=False)


def learn_template(tok: Tokenizer) -> PairTemplate | None:
    """The post-processor's template, or None when no simple template reproduces it."""
    words: list[tuple[str, int]] = []
    for w in _PROBES:
        ids = _plain(tok, w).ids
        if len(ids) == 1 and all(ids[0] != i for _, i in words):
            words.append((w, ids[0]))
    if len(words) < 2:
        return None
    (wa, ia), (wb, ib) = words[:2]
    try:
        pair = tok.post_process(_plain(tok, wa), _plain(tok, wb))
        single = tok.post_process(_plain(tok, wa))
        pa = pair.ids.index(ia)
        pb = pair.ids.index(ib, pa + 1)
        sa = single.ids.index(ia)
    except Exception:  # ValueError: a probe is not where a template would put it
        return None
    template = PairTemplate(
        single=(Part.of(single, 0, sa), Part.of(single, sa + 1, len(single.ids))),
        pair=(
            Part.of(pair, 0, pa),
            Part.of(pair, pa + 1, pb),
            Part.of(pair, pb + 1, len(pair.ids)),
        ),
        type_a=pair.type_ids[pa],
        type_b=pair.type_ids[pb],
        type_single=single.type_ids[sa],
    )
    return template if _reproduces(tok, template) else None


def _reproduces(tok: Tokenizer, template: PairTemplate) -> bool:
    """The template gives what the post-processor gives on longer sequences, too."""
    checks = (("where is my order", "user: hi | agent: hello"), ("refund please", None))
    for a_text, b_text in checks:
        a = _plain(tok, a_text)
        b = _plain(tok, b_text) if b_text else None
        want = tok.post_process(a, b)
        got = template.build(tuple(a.ids), tuple(b.ids) if b is not None else None)
        if got != (want.ids, want.type_ids):
            return False
    return True


def tokenizer_spec(tok: Tokenizer) -> dict[str, Any]:
    """The tokenizer's JSON description (normalizer, pre-tokenizer, model, added tokens)."""
    spec: dict[str, Any] = json.loads(tok.to_str())
    return spec


def splits_at_whitespace(tok: Tokenizer, spec: dict[str, Any] | None = None) -> bool:
    """Whether texts joined by whitespace encode to the concatenation of their ids
    (``spec``: :func:`tokenizer_spec` of ``tok``, when the caller has it already)."""
    spec = spec if spec is not None else tokenizer_spec(tok)
    if not _all_types(spec.get("normalizer"), _LOCAL_NORMALIZERS, "normalizers"):
        return False
    pre = spec.get("pre_tokenizer")
    if pre is None or not _all_types(pre, _WHITESPACE_PRE_TOKENIZERS, "pretokenizers"):
        return False
    # an added token with whitespace inside could match across two turns
    return not any(any(c.isspace() for c in t["content"]) for t in spec.get("added_tokens", []))


def _all_types(node: dict[str, Any] | None, allowed: frozenset[str], key: str) -> bool:
    if node is None:
        return True
    if node.get("type") == "Sequence":
        return all(_all_types(n, allowed, key) for n in node.get(key, []))
    return node.get("type") in allowed
