"""One student model, ready to answer: an onnxruntime session plus its tokenizer.

This is the only module that imports onnxruntime. A session is built from the
bytes a :class:`~stream_distill.registry.store.ModelVersion` already verified
(never from a path, so what runs is what was hashed), then :meth:`verify`
decides whether it may serve. Anything wrong becomes :class:`ModelRejected`
with a reason a human can act on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer

from stream_distill.config import ServeSettings
from stream_distill.errors import ModelRejected
from stream_distill.events import Turn
from stream_distill.models.text import TextEncoder
from stream_distill.registry.store import ModelVersion, sha256_bytes

FloatArray = npt.NDArray[np.float32]

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "logits"

_LONG = " ".join(["please check my order status and the refund for the broken blender"] * 60)
CANNED_DIALOGUES: tuple[tuple[Turn, ...], ...] = (
    (Turn(role="user", text="where is my order?"),),
    (Turn(role="user", text=""),),
    (Turn(role="user", text="?"),),
    (Turn(role="user", text=_LONG),),
    (
        Turn(role="user", text="hi"),
        Turn(role="agent", text="hello, how can i help?"),
        Turn(role="user", text=_LONG),
    ),
)
"""Inputs every candidate must handle: ordinary, empty-ish, over-long, multi-turn."""


def session_options(settings: ServeSettings) -> ort.SessionOptions:
    """Options for a latency-bound CPU session that is replaced often."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = settings.intra_op_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads burn a core each between requests; several replicas share a host.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # Every request has its own sequence length, so a cached memory pattern never fits.
    so.enable_mem_pattern = False
    # The arena dies with its session on swap; keeping the weights out of it means the
    # arena only holds activations and does not round the weights up to its chunks.
    so.enable_cpu_mem_arena = True
    so.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    so.log_severity_level = 3
    return so


def softmax(logits: npt.NDArray[np.floating]) -> FloatArray:
    """Row-wise softmax in float32, stable for large logits."""
    x: FloatArray = np.asarray(logits, dtype=np.float32)
    x = x - x.max(axis=1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=1, keepdims=True)
    return x


class StudentSession:
    """An immutable (version, onnxruntime session, tokenizer) triple; thread-safe to run."""

    def __init__(
        self,
        session: ort.InferenceSession,
        encoder: TextEncoder,
        *,
        version: str,
        labels: tuple[str, ...],
        sha256: str,
    ) -> None:
        self.version = version
        self.labels = labels
        self.sha256 = sha256
        self.encoder = encoder
        self._session = session
        self._inputs = tuple(i.name for i in session.get_inputs())
        outputs = [o.name for o in session.get_outputs()]
        self._output = OUTPUT_NAME if OUTPUT_NAME in outputs else outputs[0]

    @classmethod
    def from_version(cls, mv: ModelVersion, settings: ServeSettings) -> StudentSession:
        """Build (not yet verify) a session from a registry version's bytes."""
        if sha256_bytes(mv.model) != mv.sha256:
            raise ModelRejected(f"{mv.version}: model bytes do not match sha256 {mv.sha256}")
        if not mv.labels:
            raise ModelRejected(f"{mv.version}: empty label list")
        if len(set(mv.labels)) != len(mv.labels):
            raise ModelRejected(f"{mv.version}: duplicate labels")
        try:
            tokenizer = Tokenizer.from_str(mv.tokenizer_json)
        except Exception as exc:
            raise ModelRejected(f"{mv.version}: tokenizer.json unusable: {exc}") from exc
        try:
            session = ort.InferenceSession(
                mv.model, sess_options=session_options(settings), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            raise ModelRejected(f"{mv.version}: onnxruntime cannot load the model: {exc}") from exc
        missing = [i.name for i in session.get_inputs() if i.name not in INPUT_NAMES]
        if missing:
            raise ModelRejected(f"{mv.version}: unexpected model inputs {missing}")
        if not session.get_outputs():
            raise ModelRejected(f"{mv.version}: model has no outputs")
        encoder = TextEncoder(tokenizer, mv.max_length)
        return cls(session, encoder, version=mv.version, labels=mv.labels, sha256=mv.sha256)

    def predict(self, dialogues: Sequence[Sequence[Turn]]) -> FloatArray:
        """Probabilities ``[len(dialogues), len(labels)]`` (tokenization included)."""
        feed = self.encoder.encode(dialogues).as_feed()
        (logits,) = self._session.run([self._output], {k: feed[k] for k in self._inputs})
        return softmax(np.asarray(logits))

    def verify(self) -> None:
        """Raise :class:`ModelRejected` unless this session may serve."""
        n = len(self.labels)
        out = next(o for o in self._session.get_outputs() if o.name == self._output)
        declared = out.shape
        if len(declared) != 2:
            raise ModelRejected(f"{self.version}: output {self._output} has rank {len(declared)}")
        if isinstance(declared[1], int) and declared[1] != n:
            raise ModelRejected(f"{self.version}: output width {declared[1]} != {n} labels")
        try:
            probs = self.predict(CANNED_DIALOGUES)
            for dialogue in CANNED_DIALOGUES[:2]:  # warm-up at batch 1, as requests run
                warm = self.predict([dialogue])
        except Exception as exc:
            raise ModelRejected(f"{self.version}: inference failed: {exc}") from exc
        _check_probs(self.version, probs, len(CANNED_DIALOGUES), n)
        _check_probs(self.version, warm, 1, n)


def _check_probs(version: str, probs: FloatArray, rows: int, width: int) -> None:
    if probs.shape != (rows, width):
        raise ModelRejected(f"{version}: output shape {probs.shape}, expected {(rows, width)}")
    if not np.isfinite(probs).all():
        raise ModelRejected(f"{version}: non-finite probabilities")
    sums = probs.sum(axis=1)
    worst = float(np.abs(sums - 1.0).max())
    if not math.isfinite(worst) or worst > 1e-3:
        raise ModelRejected(f"{version}: probabilities sum off by {worst}")
