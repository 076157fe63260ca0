from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from stream_distill.models.export import export_onnx, onnx_max_abs_diff
from stream_distill.models.factory import (
    default_tokenizer_json,
    extend_head,
    labels_of,
    load_classifier,
    make_student,
    resolve_pretrained,
    set_threads,
    tiny_classifier,
)
from stream_distill.models.text import Batch, TextEncoder

LABELS = ("billing", "cancel", "greet")

set_threads(1)


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder(Tokenizer.from_str(default_tokenizer_json()), max_length=32)


def _inputs(encoder: TextEncoder) -> Batch:
    return encoder.encode_texts(
        ["hi", "please cancel my subscription right now", "why was i charged twice for order 12"]
    )


def _logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    model.train(False)
    with torch.no_grad():
        feed = {k: torch.from_numpy(v) for k, v in batch.as_feed().items()}
        out: torch.Tensor = model(**feed).logits
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(a, b))


def _head(model: torch.nn.Module) -> torch.nn.Linear:
    head = model.classifier
    assert isinstance(head, torch.nn.Linear)
    return head


def test_resolve_pretrained_points_at_bundled_minilm() -> None:
    path = Path(resolve_pretrained("minilm"))
    assert (path / "config.json").is_file()
    assert (path / "model.safetensors").is_file()
    assert resolve_pretrained("some-org/some-model") == "some-org/some-model"
    assert resolve_pretrained("models/local") == "models/local"


def test_default_tokenizer_is_bert_uncased() -> None:
    tok = Tokenizer.from_str(default_tokenizer_json())
    assert tok.token_to_id("[CLS]") == 101
    tok.no_padding()  # the shipped file pads to 128; TextEncoder turns that off too
    assert tok.encode("Hello").tokens == ["[CLS]", "hello", "[SEP]"]


def test_load_classifier_keeps_pretrained_encoder_and_adds_head() -> None:
    model = load_classifier("minilm", LABELS)
    assert labels_of(model) == LABELS
    assert model.config.label2id == {"billing": 0, "cancel": 1, "greet": 2}
    assert model.config._attn_implementation == "eager"
    assert _head(model).out_features == 3
    weights = Path(resolve_pretrained("minilm")) / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        key = next(k for k in f.keys() if k.endswith("encoder.layer.3.attention.self.query.weight"))  # noqa: SIM118
        stored = f.get_tensor(key)
    assert _same(model.state_dict()["bert.encoder.layer.3.attention.self.query.weight"], stored)


def test_tiny_classifier_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_classifier(LABELS, seed=5)
    after = torch.rand(3)
    b = tiny_classifier(LABELS, seed=5)
    c = tiny_classifier(LABELS, seed=6)
    assert _same(expected, after)
    assert _same(_head(a).weight, _head(b).weight)
    assert not _same(_head(a).weight, _head(c).weight)
    assert a.config.num_hidden_layers == 4 and a.config.hidden_size == 64
    assert labels_of(a) == LABELS


def test_student_copies_chosen_layers_embeddings_and_head() -> None:
    teacher = tiny_classifier(LABELS, layers=4)
    student = make_student(teacher, (0, 2))
    assert student.config.num_hidden_layers == 2
    assert teacher.config.num_hidden_layers == 4
    t, s = teacher.state_dict(), student.state_dict()
    for key, value in s.items():
        if ".layer.0." in key:
            assert _same(value, t[key]), key
        elif ".layer.1." in key:
            assert _same(value, t[key.replace(".layer.1.", ".layer.2.")]), key
        else:
            assert _same(value, t[key]), key
    # layer 1 of the student is not the teacher's layer 1
    q = "bert.encoder.layer.1.attention.self.query.weight"
    assert not _same(s[q], t[q])
    # the copy is deep: training the student leaves the teacher alone
    with torch.no_grad():
        _head(student).weight.add_(1.0)
    assert not _same(_head(student).weight, _head(teacher).weight)


def test_student_with_all_layers_matches_teacher(encoder: TextEncoder) -> None:
    teacher = tiny_classifier(LABELS, layers=3)
    student = make_student(teacher, (0, 1, 2))
    batch = _inputs(encoder)
    assert torch.allclose(_logits(student, batch), _logits(teacher, batch), atol=1e-6)


def test_student_layer_indices_are_clamped() -> None:
    teacher = tiny_classifier(LABELS, layers=4)
    student = make_student(teacher, (0, 5))  # the default for a 6-layer teacher
    q = "bert.encoder.layer.{}.output.dense.weight"
    assert _same(student.state_dict()[q.format(1)], teacher.state_dict()[q.format(3)])
    with pytest.raises(ValueError):
        make_student(teacher, ())


def test_onnx_export_matches_torch(encoder: TextEncoder) -> None:
    teacher = tiny_classifier(LABELS, layers=4)
    for model in (teacher, make_student(teacher, (0, 3))):
        model.train(True)  # export must switch dropout off by itself
        data = export_onnx(model, max_length=32)
        assert not model.training
        graph = onnx.load_from_string(data).graph
        assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
        assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in graph.input)
        assert [o.name for o in graph.output] == ["logits"]
        assert onnx_max_abs_diff(model, data, _inputs(encoder)) < 1e-4


def test_onnx_export_has_dynamic_batch_and_sequence() -> None:
    import onnxruntime as ort

    model = tiny_classifier(LABELS, layers=2)
    data = export_onnx(model, max_length=64)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for n, width in [(1, 1), (5, 20), (3, 64)]:
        ids = rng.integers(1000, 2000, (n, width)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[0, width // 2 + 1 :] = 0
        batch = Batch(ids, mask, np.zeros_like(ids))
        (got,) = session.run(["logits"], batch.as_feed())
        assert got.shape == (n, 3)
        assert onnx_max_abs_diff(model, data, batch) < 1e-4


def test_extend_head_keeps_old_rows(encoder: TextEncoder) -> None:
    model = tiny_classifier(LABELS, layers=2)
    batch = _inputs(encoder)
    before = _logits(model, batch)
    old_w = _head(model).weight.detach().clone()
    extend_head(model, (*LABELS, "refund", "shipping"))
    assert labels_of(model) == (*LABELS, "refund", "shipping")
    assert model.config.num_labels == 5 and model.num_labels == 5
    assert (model.config.label2id or {}).get("shipping") == 4
    assert _same(_head(model).weight.detach()[:3], old_w)
    after = _logits(model, batch)
    assert after.shape == (3, 5)
    assert torch.allclose(after[:, :3], before, atol=1e-6)


def test_extend_head_follows_labels_by_name_and_refuses_drops() -> None:
    model = tiny_classifier(LABELS, layers=2)
    old_w = _head(model).weight.detach().clone()
    old_b = _head(model).bias.detach().clone()
    extend_head(model, ("new", "greet", "billing", "cancel"))
    w, b = _head(model).weight.detach(), _head(model).bias.detach()
    assert _same(w[1], old_w[2]) and _same(w[2], old_w[0]) and _same(w[3], old_w[1])
    assert _same(b[1:], old_b[[2, 0, 1]])
    with pytest.raises(ValueError, match="dropped"):
        extend_head(model, ("new", "greet"))
    with pytest.raises(ValueError, match="duplicate"):
        extend_head(model, ("new", "greet", "billing", "cancel", "new"))
