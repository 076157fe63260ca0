"""Dialogue encoding: pairs as the tokenizer makes them, cut to the budget token by token."""

from __future__ import annotations

import multiprocessing
import uuid

import pytest
from tokenizers import Tokenizer

from stream_distill.events import Turn, new_id
from stream_distill.models.factory import default_tokenizer_json
from stream_distill.models.text import TextEncoder, split_dialogue

BUDGET = 16


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer.from_str(default_tokenizer_json())
    tok.no_padding()
    tok.no_truncation()
    return tok


@pytest.fixture(scope="module")
def encoder(tokenizer: Tokenizer) -> TextEncoder:
    return TextEncoder(tokenizer, max_length=BUDGET)


def dialogue(*texts: str) -> list[Turn]:
    roles = ("user", "agent")
    return [Turn(role=roles[i % 2], text=t) for i, t in enumerate(texts)]


def words(prefix: str, n: int) -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


def test_short_pairs_encode_as_the_tokenizer_pairs_them(
    encoder: TextEncoder, tokenizer: Tokenizer
) -> None:
    for turns in (dialogue("where is my order"), dialogue("hi", "hello", "refund please")):
        current, context = split_dialogue(turns)
        want = tokenizer.encode(current, context or None)
        batch = encoder.encode([turns])
        assert batch.input_ids[0].tolist() == want.ids
        assert batch.token_type_ids[0].tolist() == want.type_ids


def test_long_dialogue_keeps_current_head_and_context_tail(
    encoder: TextEncoder, tokenizer: Tokenizer
) -> None:
    old, recent, current = "a b c d e f g h i j", "x y z", "where is my order"
    batch = encoder.encode([dialogue(old, recent, current)])
    ids = batch.input_ids[0].tolist()
    assert len(ids) == BUDGET and batch.attention_mask[0].sum() == BUDGET
    tokens = [tokenizer.id_to_token(i) for i in ids]
    n_cur = len(tokenizer.encode(current, add_special_tokens=False).ids)
    # [CLS] current [SEP] ...context tail [SEP]: the whole current turn, then the newest turns
    assert tokens[0] == "[CLS]" and tokens[n_cur + 1] == "[SEP]" and tokens[-1] == "[SEP]"
    assert tokens[1 : n_cur + 1] == tokenizer.encode(current, add_special_tokens=False).tokens
    context = split_dialogue(dialogue(old, recent, current))[1]
    keep = BUDGET - n_cur - 3
    tail = tokenizer.encode(context, add_special_tokens=False).tokens[-keep:]
    assert tokens[n_cur + 2 : -1] == tail
    assert tokens[-4:-1] == ["x", "y", "z"] and "a" not in tokens  # the oldest went first
    assert batch.token_type_ids[0].tolist() == [0] * (n_cur + 2) + [1] * (BUDGET - n_cur - 2)


def test_an_overlong_current_turn_keeps_its_head_alone(
    encoder: TextEncoder, tokenizer: Tokenizer
) -> None:
    current = words("w", 40)
    batch = encoder.encode([dialogue("some context", current)])
    tokens = [tokenizer.id_to_token(i) for i in batch.input_ids[0].tolist()]
    head = tokenizer.encode(current, add_special_tokens=False).tokens[: BUDGET - 2]
    assert tokens == ["[CLS]", *head, "[SEP]"]  # no room for context at all
    assert set(batch.token_type_ids[0].tolist()) == {0}


def test_ids_are_unique_uuid4_and_a_fork_does_not_repeat_them() -> None:
    ids = [new_id() for _ in range(1000)]  # more than one read of random bytes
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(i).version == 4 and len(i) == 32 for i in ids)
    new_id()  # the pool holds unread ids now; a forked child must not hand them out
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        child = pool.apply(new_id)
    mine = {new_id() for _ in range(300)}
    assert child not in mine and child not in ids
