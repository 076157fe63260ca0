"""Student → ONNX bytes that serve can load without torch.

The graph takes the three int64 inputs of :class:`~stream_distill.models.text.Batch`
(dynamic batch and sequence axes) and returns ``logits`` [batch, n_labels].
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from transformers import PreTrainedModel

from stream_distill.models.text import Batch

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "logits"
OPSET = 17


class _LogitsOnly(torch.nn.Module):
    """Positional inputs and a bare tensor output: what the TorchScript exporter traces cleanly."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        )
        logits: torch.Tensor = out.logits
        return logits


def _sample_inputs(max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Two rows of different lengths so padding paths are traced, not constant-folded away.
    width = max(4, min(max_length, 16))
    ids = torch.full((2, width), 101, dtype=torch.int64)
    mask = torch.ones((2, width), dtype=torch.int64)
    mask[1, width // 2 :] = 0
    types = torch.zeros((2, width), dtype=torch.int64)
    return ids, mask, types


def export_onnx(model: PreTrainedModel, max_length: int) -> bytes:
    """Serialise ``model`` (switched to eval mode) as a self-contained ONNX model."""
    model.train(False)
    wrapper = _LogitsOnly(model).train(False)
    axes: dict[str, dict[int, str]] = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    axes[OUTPUT_NAME] = {0: "batch"}
    with tempfile.TemporaryDirectory(prefix="sd-export-") as tmp:
        path = Path(tmp) / "model.onnx"
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter is chosen on purpose (fast, no onnxscript optimiser pass);
            # its deprecation notice and tracer remarks about fixed BERT shapes are noise here.
            # The graph is checked numerically by onnx_max_abs_diff before it is published.
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index", category=UserWarning)
            torch.onnx.export(
                wrapper,
                _sample_inputs(max_length),
                str(path),
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_axes=axes,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        return path.read_bytes()


def onnx_max_abs_diff(model: PreTrainedModel, onnx_bytes: bytes, batch: Batch) -> float:
    """Largest |torch − onnxruntime| logit on ``batch``: the check before a version is published."""
    model.train(False)
    with torch.no_grad():
        expected = (
            _LogitsOnly(model)(
                torch.from_numpy(batch.input_ids),
                torch.from_numpy(batch.attention_mask),
                torch.from_numpy(batch.token_type_ids),
            )
            .float()
            .numpy()
        )
    return float(np.max(np.abs(onnx_logits(onnx_bytes, [batch]) - expected)))


def onnx_logits(onnx_bytes: bytes, batches: Sequence[Batch]) -> npt.NDArray[np.float32]:
    """Logits of an exported model on ``batches`` (rows concatenated), via onnxruntime."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    out = [np.asarray(session.run([OUTPUT_NAME], b.as_feed())[0], np.float32) for b in batches]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def quantize_int8(onnx_bytes: bytes) -> bytes:
    """Dynamic int8 quantisation: int8 weights (per output channel), activations quantised
    at run time. Serve loads the result like any other ONNX model."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = _DropPreprocessAdvice()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        with tempfile.TemporaryDirectory(prefix="sd-quant-") as tmp:
            src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            src.write_bytes(onnx_bytes)
            quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8)
            return dst.read_bytes()
    finally:
        root.removeFilter(quiet)


class _DropPreprocessAdvice(logging.Filter):
    # onnxruntime advises shape-inference pre-processing on every call (root logger); the
    # result is checked against fp32 before it may be published, so the advice is noise.
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def softmax_rows(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    x = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(x)
    out: npt.NDArray[np.float32] = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return out


def compare_onnx(
    reference: bytes, candidate: bytes, batches: Sequence[Batch]
) -> tuple[float, float]:
    """``(argmax agreement, max |Δ probability|)`` of ``candidate`` against ``reference``."""
    ref = softmax_rows(onnx_logits(reference, batches))
    got = softmax_rows(onnx_logits(candidate, batches))
    if ref.shape[0] == 0:
        return float("nan"), float("nan")
    agreement = float(np.mean(ref.argmax(axis=1) == got.argmax(axis=1)))
    return agreement, float(np.max(np.abs(ref - got)))
