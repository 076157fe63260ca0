"""Dialogue encoding: pairs as the tokenizer makes them, cut to the budget token by token."""

from __future__ import annotations

import multiprocessing
import uuid

import pytest
from tokenizers import Tokenizer

from stream_distill.data.synthetic import labelled_examples
from stream_distill.events import Turn, new_id
from stream_distill.models.pairs import learn_template, splits_at_whitespace
from stream_distill.models.text import TextEncoder, split_dialogue

BUDGET = 16


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


ODD_TURNS = (
    "Où est ma commande ?!",
    "退款 please (order #A-17)",
    "",
    "   spaces   around   ",
    "a|b||c | d",
    "user: agent: [SEP] [CLS]",
    "emoji 🙂 and tabs\tand\nnewlines",
)


def varied_dialogues() -> list[list[Turn]]:
    out = [list(ex.turns) for ex in labelled_examples(300, seed=11)]
    for i in range(len(ODD_TURNS)):  # odd texts in every position of a dialogue
        texts = [ODD_TURNS[(i + k) % len(ODD_TURNS)] for k in range(6)] + ["why?"]
        out.append(dialogue(*texts))
    return out


@pytest.mark.parametrize("budget", [8, 16, 48, 128])
def test_turn_by_turn_ids_equal_the_joined_texts(tokenizer: Tokenizer, budget: int) -> None:
    """Cached turn ids and the learnt template give exactly the tokenizer's own pair."""
    fast = TextEncoder(tokenizer, max_length=budget)
    assert fast.caches_turns
    dialogues = varied_dialogues()
    for _ in range(2):  # cold cache, then every turn from the cache
        for turns in dialogues:
            assert fast._encode_one(turns) == fast._encode_plain(turns), turns


def test_the_turn_cache_is_bounded(tokenizer: Tokenizer) -> None:
    enc = TextEncoder(tokenizer, max_length=48, cache_turns=50)
    dialogues = varied_dialogues()
    for turns in dialogues:
        assert enc._encode_one(turns) == enc._encode_plain(turns)
    assert len(enc._turns) == 50


def byte_level_bpe() -> Tokenizer:
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"])
    corpus = [t.text for ex in labelled_examples(200, seed=2) for t in ex.turns]
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 1), ("<s>", 0))
    return tok


def test_a_byte_level_tokenizer_encodes_the_joined_context() -> None:
    """Spaces belong to the next token there: turn by turn would change the ids."""
    tok = byte_level_bpe()
    assert not splits_at_whitespace(tok)
    template = learn_template(tok)
    assert template is not None and template.pair_specials == 4  # <s> A </s></s> B </s>
    enc = TextEncoder(tok, max_length=24)
    assert not enc.caches_turns
    for turns in varied_dialogues()[:100]:
        ids, types = enc._encode_one(turns)
        assert (ids, types) == enc._encode_plain(turns)
        current, context = split_dialogue(turns)
        want = tok.encode(current, context or None)
        if len(want.ids) <= 24:  # short enough to need no cut: the tokenizer's own pair
            assert ids == want.ids
