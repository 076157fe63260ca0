"""Word-level ids for BERT tokenizers: exactly the Rust tokenizer's ids, or no answer."""

from __future__ import annotations

import random
import string

import pytest
from tokenizers import Tokenizer

from stream_distill.data.synthetic import labelled_examples
from stream_distill.models.wordpiece import WordIds


def rust(tok: Tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tok.encode(text, add_special_tokens=False).ids)


def random_ascii(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + string.punctuation + " \t\n\r" * 3
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(8)]
    return " ".join(words)


def test_ascii_text_gets_exactly_the_tokenizers_ids(tokenizer: Tokenizer) -> None:
    words = WordIds.of(tokenizer)
    assert words is not None
    rng = random.Random(7)
    texts = [t.text for ex in labelled_examples(2000, seed=9) for t in ex.turns]
    texts += [random_ascii(rng) for _ in range(3000)]
    texts += ["", "   ", "Hello, WORLD!!", "x" * 150, "a" * 99 + " " + "b" * 101, "it's $4.50/mo"]
    answered = 0
    for text in texts:
        for _ in range(2):  # new words, then cached ones
            got = words.ids(text)
            if got is not None:
                answered += 1
                assert got == rust(tokenizer, text), text
    plain = [t for t in texts if t.isascii()]
    assert len(plain) > len(texts) // 2
    assert answered == 2 * len(plain)  # every plain ASCII one; the rest asks the tokenizer


@pytest.mark.parametrize(
    "text",
    [
        "café au lait",  # not ASCII
        "refund\x0bplease",  # a control character the normalizer drops
        "null\x00byte",
        "what does [SEP] mean",  # an added token, matched before splitting
        "what does [sep] mean",
        "[MASK] it",
    ],
)
def test_text_it_cannot_be_sure_of_goes_to_the_tokenizer(tokenizer: Tokenizer, text: str) -> None:
    words = WordIds.of(tokenizer)
    assert words is not None
    assert words.ids(text) is None


def test_only_plain_bert_wordpiece_tokenizers_get_one(tokenizer: Tokenizer) -> None:
    from tokenizers import models, normalizers, pre_tokenizers

    other = Tokenizer.from_str(tokenizer.to_str())
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    assert WordIds.of(other) is None
    other = Tokenizer.from_str(tokenizer.to_str())
    other.normalizer = normalizers.Lowercase()
    assert WordIds.of(other) is None
    assert WordIds.of(Tokenizer(models.BPE())) is None


def test_a_cased_tokenizer_keeps_case(tokenizer: Tokenizer) -> None:
    from tokenizers import normalizers

    cased = Tokenizer.from_str(tokenizer.to_str())
    cased.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    words = WordIds.of(cased)
    assert words is not None
    for text in ("Where IS my Order #A17?", "refund please", "OK"):
        assert words.ids(text) == rust(cased, text)
