"""``stream-distill teacher-serve``: the torch teacher behind serve's own HTTP API.

The teacher stands where the ONNX student stands (a
:class:`~stream_distill.serving.predictor.Predictor`), so ``/v1/classify``,
``/v2/models/{name}/infer``, micro-batching, deadlines, load shedding and
``/metrics`` behave exactly as in ``serve``. It is what a serve replica's cascade
asks when its student is unsure, and what a benchmark measures the teacher's rate on.

Settings are serve's (``--host``/``--port``, ``SD_SERVE__*``), except that batches hold
up to ``teacher.batch_size`` requests and torch runs ``teacher.threads`` threads in
``teacher.precision``, as the scorer does. Every answer lists every label in ``top``
(``top_k`` is the label count), so a caller gets the teacher's whole distribution; no
attention is computed. No request events are written: the teacher's answers are not
student traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from stream_distill.config import ServeSettings, Settings
from stream_distill.errors import RegistryError
from stream_distill.events import Turn
from stream_distill.metrics.hooks import Hooks
from stream_distill.metrics.prometheus import PrometheusHooks
from stream_distill.models.precision import use_bfloat16_for
from stream_distill.registry.base import ModelVersion
from stream_distill.serving.http import HttpServer, create_app
from stream_distill.serving.service import ServingCore
from stream_distill.teacher.model import TeacherModel, read_meta

log = logging.getLogger(__name__)

WARM_UP: tuple[tuple[Turn, ...], ...] = (
    (Turn(role="user", text="where is my order?"),),
    (Turn(role="user", text="hi"), Turn(role="agent", text="hello"), Turn(role="user", text="?")),
)


Precision = Literal["auto", "float32", "bfloat16"]


class TeacherPredictor:
    """A :class:`TeacherModel` as serve's predictor: probabilities, no attention.

    ``precision`` is ``teacher.precision``: ``bfloat16`` runs the model under CPU
    autocast, as the scorer does. autocast is per thread, so :meth:`predict` enters it
    itself, in whichever thread the batcher runs it.
    """

    def __init__(self, model: TeacherModel, precision: Precision = "float32") -> None:
        self.model = model
        self.version = model.version
        self.labels = model.labels
        self.precision = precision
        self.sha256 = _weights_sha256(model)

    def predict(self, dialogues: Sequence[Sequence[Turn]]) -> npt.NDArray[np.float32]:
        bf16 = use_bfloat16_for(self.precision, len(dialogues))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = self.model.predict(dialogues, attention=False).logits
        probs: npt.NDArray[np.float32] = torch.from_numpy(logits).softmax(dim=-1).numpy()
        return probs


def _weights_sha256(model: TeacherModel) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def load_teacher(name_or_path: str, settings: Settings) -> TeacherModel:
    """A bootstrapped teacher directory, or any HF sequence classifier by name or path."""
    teacher_id = settings.teacher.teacher_id
    if read_meta(Path(name_or_path)) is not None:
        return TeacherModel.load(name_or_path, teacher_id=teacher_id)
    from tokenizers import Tokenizer
    from transformers import AutoModelForSequenceClassification

    from stream_distill.models.factory import resolve_pretrained, tokenizer_json
    from stream_distill.models.text import TextEncoder

    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_pretrained(name_or_path), attn_implementation="eager"
    )
    tokenizer = Tokenizer.from_str(tokenizer_json(name_or_path))
    encoder = TextEncoder(tokenizer, settings.model.max_length)
    return TeacherModel(model, encoder, teacher_id=teacher_id)


class _NoVersions:
    """The registry of a serve that runs one installed model: it never holds a version."""

    def uri(self, version: str) -> str:
        raise RegistryError("teacher-serve has no registry")

    def list_versions(self) -> list[str]:
        return []

    def latest(self) -> str | None:
        return None

    def next_version(self) -> str:
        raise RegistryError("teacher-serve has no registry")

    def publish(self, *args: Any, **kwargs: Any) -> ModelVersion:
        raise RegistryError("teacher-serve has no registry")

    def load(self, version: str) -> ModelVersion:
        raise RegistryError("teacher-serve has no registry")

    def read_manifest(self, version: str) -> dict[str, Any]:
        raise RegistryError("teacher-serve has no registry")

    def prune(self, keep: int, protect: set[str] | frozenset[str] = frozenset()) -> list[str]:
        return []


@dataclass(frozen=True, slots=True)
class RunningTeacherServe:
    core: ServingCore
    app: FastAPI
    server: HttpServer
    metrics: CollectorRegistry

    @property
    def url(self) -> str:
        return self.server.url


@contextlib.asynccontextmanager
async def run_teacher_serve(
    model: TeacherModel,
    settings: ServeSettings,
    *,
    hooks: Hooks | None = None,
    metrics: CollectorRegistry | None = None,
    host: str | None = None,
    port: int | None = None,
    precision: Precision = "float32",
) -> AsyncIterator[RunningTeacherServe]:
    """Serve ``model`` over HTTP until the block exits; ready as soon as it is entered.

    ``host``/``port`` override ``settings`` (0: any port); ``precision`` is
    ``teacher.precision``. Call with torch's threads already set (one per role).
    """
    predictor = TeacherPredictor(model, precision)
    await asyncio.to_thread(predictor.predict, WARM_UP)  # the first request pays no warm-up
    # Every label in every answer (a cascade publishes the whole distribution); a
    # teacher never cascades to itself.
    settings = settings.model_copy(
        update={"top_k": len(predictor.labels), "cascade_enabled": False}
    )
    metrics = metrics if metrics is not None else CollectorRegistry()
    hooks = hooks if hooks is not None else PrometheusHooks(metrics)
    async with contextlib.AsyncExitStack() as stack:
        # The watcher of a core without versions never loads anything: poll it rarely.
        core = ServingCore(_NoVersions(), settings, hooks, poll_interval_s=3600.0)
        core.install(predictor)
        await core.start()
        stack.push_async_callback(core.aclose)
        app = create_app(core, metrics=metrics)
        server = HttpServer(app, host or settings.host, settings.port if port is None else port)
        await server.start()
        stack.push_async_callback(server.aclose)
        yield RunningTeacherServe(core, app, server, metrics)


async def teacher_serve(
    settings: Settings, teacher: str, stop: asyncio.Event | None = None
) -> None:
    """The ``teacher-serve`` role: load ``teacher``, serve until SIGTERM/SIGINT (or ``stop``)."""
    from stream_distill.app import stop_on_signals
    from stream_distill.heap import freeze_startup
    from stream_distill.models.factory import set_threads

    stop = stop or stop_on_signals()

    set_threads(settings.teacher.threads)
    model = await asyncio.to_thread(load_teacher, teacher, settings)
    # Batches as large as the scorer's: the teacher's throughput knob is teacher.batch_size.
    serve = settings.serve.model_copy(update={"batch_max_size": settings.teacher.batch_size})
    precision = settings.teacher.precision
    async with run_teacher_serve(model, serve, precision=precision) as running:
        freeze_startup()
        log.info(
            "teacher-serve listening on %s (teacher %s, %d labels, %s)",
            running.url,
            model.version,
            len(model.labels),
            precision,
        )
        await stop.wait()
        # As serve drains: "not ready" at once, answering on for the grace period.
        running.core.begin_drain()
        await asyncio.sleep(settings.serve.drain_grace_s)
