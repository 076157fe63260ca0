from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tokenizers import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from stream_distill.bus.broker import EmbeddedBroker
from stream_distill.models.factory import default_tokenizer_json


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """One real Kafka-protocol broker process for the whole run."""
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture
def prefix() -> str:
    """A topic prefix of this test's own, so tests on the shared broker never meet."""
    return f"t{uuid.uuid4().hex[:8]}."


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small BERT teacher trained in code on synthetic dialogues (cached for the run)."""
    import torch

    from stream_distill.data.synthetic import labelled_examples
    from stream_distill.models.factory import tiny_classifier
    from stream_distill.teacher.bootstrap import bootstrap_teacher

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("teacher") / "tiny"
    examples = [(ex.turns, ex.intent) for ex in labelled_examples(3000, seed=11)]
    bootstrap_teacher(
        examples,
        out,
        max_length=32,
        epochs=4,
        lr=1e-3,
        model_factory=lambda labels: tiny_classifier(labels, layers=2, hidden=64, heads=4),
    )
    return out


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """The default (BERT) tokenizer, without padding or truncation."""
    tok = Tokenizer.from_str(default_tokenizer_json())
    tok.no_padding()
    tok.no_truncation()
    return tok
