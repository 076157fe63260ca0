"""Weight imprinting: a new label's row from its examples' features; old rows untouched."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from stream_distill.events import Turn
from stream_distill.models.factory import (
    default_tokenizer_json,
    extend_head,
    head_of,
    tiny_classifier,
)
from stream_distill.models.imprint import classifier_inputs, imprint
from stream_distill.models.text import TextEncoder

LABELS = ("billing", "cancel", "greet")


def _dialogues(*texts: str) -> list[list[Turn]]:
    return [[Turn(role="user", text=t)] for t in texts]


def test_classifier_inputs_are_what_the_head_projects() -> None:
    model = tiny_classifier(LABELS, layers=2, seed=1)
    encoder = TextEncoder(Tokenizer.from_str(default_tokenizer_json()), max_length=16)
    dialogues = _dialogues("hi there", "cancel my plan please")
    features = classifier_inputs(model, encoder, dialogues)
    model.train(False)
    with torch.no_grad():
        batch = encoder.encode(dialogues)
        logits = model(**{k: torch.from_numpy(v) for k, v in batch.as_feed().items()}).logits
    assert features.shape == (2, model.config.hidden_size)
    assert torch.allclose(head_of(model)(features), logits, atol=1e-5)


def test_new_rows_start_from_mean_features_scaled_to_the_old_rows() -> None:
    model = tiny_classifier(LABELS, layers=2, seed=2)
    encoder = TextEncoder(Tokenizer.from_str(default_tokenizer_json()), max_length=16)
    model.train(True)  # imprinting must not leave it in another mode
    extend_head(model, (*LABELS, "promo", "quiet"))
    head = head_of(model)
    before = head.weight.detach().clone()
    examples = {
        "promo": _dialogues("is the spring sale on", "any discount codes today"),
        "quiet": [],  # no examples: its row stays as extend_head made it
        "billing": _dialogues("an old label is never imprinted"),
    }
    assert imprint(model, encoder, examples, old=len(LABELS)) == ["promo"]
    assert model.training
    after = head.weight.detach()
    assert torch.equal(after[: len(LABELS)], before[: len(LABELS)])
    assert torch.equal(after[4], before[4])
    mean = classifier_inputs(model, encoder, examples["promo"]).mean(dim=0)
    norm = before[: len(LABELS)].norm(dim=1).mean()
    assert torch.allclose(after[3], mean / mean.norm() * norm, atol=1e-5)
    # the imprinted row scores its own examples above the untouched new row
    feats = classifier_inputs(model, encoder, examples["promo"])
    scores = head(feats)
    assert bool((scores[:, 3] > scores[:, 4]).all())
