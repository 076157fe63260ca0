"""Build the trainer's learner from a teacher (DistilBERT-style student)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from stream_distill.config import ModelSettings, TrainerSettings
from stream_distill.models.factory import make_student
from stream_distill.models.text import TextEncoder
from stream_distill.teacher.model import TeacherModel
from stream_distill.trainer.learner import Learner


def learner_from_teacher(
    teacher: TeacherModel, model: ModelSettings, trainer: TrainerSettings, seed: int = 0
) -> Learner:
    """Embeddings, ``model.student_layers``, pooler and head of the teacher (DistilBERT-style).

    With ``model.student_fresh_head`` the classifier starts from noise instead, so all
    the student knows of the intents is what the stream teaches it.
    """
    student = make_student(teacher.model, model.student_layers)
    if model.student_fresh_head:
        head = student.classifier
        if not isinstance(head, torch.nn.Linear):
            raise TypeError(f"expected a linear classifier head, got {type(head).__name__}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head.reset_parameters()
    if trainer.freeze_word_embeddings:
        embeddings = student.get_input_embeddings()
        if isinstance(embeddings, torch.nn.Embedding):
            embeddings.weight.requires_grad_(False)
    encoder = TextEncoder(Tokenizer.from_str(teacher.encoder.to_str()), model.max_length)
    return Learner(student, encoder, teacher.labels, trainer)
