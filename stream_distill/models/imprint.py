"""Weight imprinting: a new label's classifier row starts from its examples' features.

When a label is added with only one or two examples, a row that starts from noise
learns little in a short update (measured on CLINC150 with MiniLM-L6: five new intents,
two labels each, 60 steps: recall 0.00 on their test turns). Imprinting (Qi, Brown and
Lowe, CVPR 2018) sets the row to the mean of the examples' inputs to the classifier
(the pooled features), scaled to the mean length of the existing rows, so the model
tells the new label apart at once (0.83 before any step, 0.85 after the same 60).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import PreTrainedModel

from stream_distill.events import Turn
from stream_distill.models.factory import head_of, labels_of
from stream_distill.models.text import TextEncoder

MAX_EXAMPLES = 32
"""Examples per label whose features are averaged (the newest ones)."""


def classifier_inputs(
    model: PreTrainedModel, encoder: TextEncoder, dialogues: Sequence[Sequence[Turn]]
) -> torch.Tensor:
    """``[len(dialogues), hidden]``: what the classifier projection sees for each dialogue."""
    head = head_of(model)
    seen: list[torch.Tensor] = []

    def capture(_: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append(args[0].detach().float())

    handle = head.register_forward_pre_hook(capture)
    was_training = model.training
    model.train(False)
    try:
        with torch.inference_mode():
            batch = encoder.encode(dialogues)
            model(**{k: torch.from_numpy(v) for k, v in batch.as_feed().items()})
    finally:
        handle.remove()
        model.train(was_training)
    out = torch.cat(seen)
    return out[:, 0] if out.dim() == 3 else out  # a head over tokens: the first one's


def imprint(
    model: PreTrainedModel,
    encoder: TextEncoder,
    examples: Mapping[str, Sequence[Sequence[Turn]]],
    old: int,
) -> list[str]:
    """Set the rows of labels ``examples`` names (each at index >= ``old``) from their
    examples; returns the labels imprinted. Rows below ``old`` are never touched."""
    labels = list(labels_of(model))
    head = head_of(model)
    done = []
    with torch.no_grad():
        norm = head.weight[:old].float().norm(dim=1).mean() if old else torch.tensor(1.0)
        for label, dialogues in examples.items():
            if label not in labels or not dialogues:
                continue
            i = labels.index(label)
            if i < old:
                continue
            features = classifier_inputs(model, encoder, list(dialogues)[-MAX_EXAMPLES:])
            mean = features.mean(dim=0)
            length = mean.norm()
            if not torch.isfinite(length) or length == 0:
                continue
            head.weight[i] = (mean / length * norm).to(head.weight.dtype)
            done.append(label)
    return done
