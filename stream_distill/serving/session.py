"""One student model, ready to answer: an onnxruntime session plus its tokenizer.

This is the only module that imports onnxruntime. A session is built from the
content a :class:`~stream_distill.registry.store.ModelVersion` already verified
(never from the registry's path, so what runs is what was hashed), then :meth:`verify`
decides whether it may serve. Anything wrong becomes :class:`ModelRejected`
with a reason a human can act on.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import math
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer

from stream_distill.config import ServeSettings
from stream_distill.errors import ModelRejected
from stream_distill.events import Turn
from stream_distill.models.text import Batch, TextEncoder
from stream_distill.registry.sealed import SealedFile, sealing_available
from stream_distill.registry.store import ModelVersion
from stream_distill.threads import low_priority_executor, lower_this_thread

FloatArray = npt.NDArray[np.float32]
P = ParamSpec("P")
T = TypeVar("T")

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


GRAPH_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(settings: ServeSettings) -> ort.SessionOptions:
    """Options for a latency-bound CPU session that is replaced often."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = settings.intra_op_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = GRAPH_OPTIMIZATION[settings.graph_optimization]
    # Spinning threads burn a core each between requests; several replicas share a host.
    spin = "1" if settings.intra_op_spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # Every request has its own sequence length, so a cached memory pattern never fits.
    so.enable_mem_pattern = False
    # No arena: an arena grows in chunks on the batch thread and is freed with its
    # session on another, and serve's RSS crept up with every hot swap (onnxruntime
    # issue #26831 describes the same). Plain malloc, trimmed on the next load (see
    # trim_heap), kept RSS flat over hundreds of swaps at the same batch-1 latency.
    so.enable_cpu_mem_arena = False
    so.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    # A model comes from verified bytes and must be self-contained: external-data paths
    # resolve inside an empty private folder, so a candidate cannot pull in any file.
    so.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", _no_external_data_dir()
    )
    so.log_severity_level = 3
    return so


LOAD_NICE = 10
"""Niceness of the model-loading thread: a load (seconds of CPU) yields to requests."""


@functools.cache
def _loader() -> ThreadPoolExecutor:
    return low_priority_executor("sd-load", LOAD_NICE)


async def in_background(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``fn`` on the model-loading thread, which runs at a lower CPU priority, so
    loading and verifying a candidate does not slow the requests served meanwhile."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_loader(), functools.partial(fn, *args, **kwargs))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to trim
        return None
    return libc if hasattr(libc, "malloc_trim") else None


TRIM_ABOVE_MB = 32.0
"""Resident growth over the process's settled size at which a load trims the heap first."""

_settled_mb: list[float] = []
"""Resident MB right after the first trim, raised by later ones (none yet: trim)."""


def _resident_mb() -> float:
    """This process's resident memory in MB (inf where procfs cannot say)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return math.inf


def trim_heap() -> None:
    """Give the heap pages freed by swapped-out sessions back to the OS (glibc only),
    once resident memory has grown :data:`TRIM_ABOVE_MB` over its settled size.

    A session's weights and buffers are freed into the malloc arena they came from,
    where the next load mostly reuses them. Trimming returns the pages with ``madvise``,
    which interrupts every core running one of this process's threads (the event loop's
    included) and makes the next load fault fresh pages in: with a trim on every load,
    p99 during back-to-back swaps was 1.5-1.8x steady, without 1.3-1.4x, and resident
    memory stayed within 40 MB over 400 swaps either way. So it trims only on growth.
    """
    libc = _libc()
    if libc is None:
        return
    settled = _settled_mb[0] if _settled_mb else None
    if settled is not None and _resident_mb() < settled + TRIM_ABOVE_MB:
        return
    libc.malloc_trim(0)
    after = _resident_mb()
    if math.isfinite(after):  # else no procfs: every load trims
        _settled_mb[:] = [after if settled is None else max(after, settled)]


_DROPS: queue.SimpleQueue[object] = queue.SimpleQueue()
"""onnxruntime sessions of dropped :class:`StudentSession` objects, to be freed."""

_QUIET = threading.Event()
QUIET_WAIT_S = 0.05
"""How long a session waits to be freed for an answer to leave (then it is freed anyway)."""


def answer_left() -> None:
    """An answer just left: the dropper's moment (see :func:`_dropper`)."""
    _QUIET.set()


@functools.cache
def _dropper() -> threading.Thread:
    # Freeing a session holds the GIL for about 1.4 ms (the student, measured), so a
    # request arriving meanwhile waits that long. Right after an answer left, the next
    # request is most likely further away than that: the dropper waits for that moment
    # (or QUIET_WAIT_S, under load that never pauses).
    def drop() -> None:
        lower_this_thread(LOAD_NICE)
        while True:
            session = _DROPS.get()
            _QUIET.clear()
            _QUIET.wait(QUIET_WAIT_S)
            del session  # the last reference: onnxruntime frees it here

    thread = threading.Thread(target=drop, name="sd-drop", daemon=True)
    thread.start()
    return thread


def _load_session(model: bytes | SealedFile, options: ort.SessionOptions) -> ort.InferenceSession:
    """A session from verified bytes, loaded by path.

    Measured: from bytes, onnxruntime parses the model holding the GIL (a 30-60 ms stall
    of the event loop per load of the 60 MB student); from a path it parses with the GIL
    released (a stall under 5 ms), and faster. The path is a sealed in-memory file (the
    registry's own, or a sealed copy of ``model``): no copy on disk, and nothing can
    change it between the sha256 check and the load. It sits alone in a fresh private
    folder, so a relative external-data path finds nothing. Without sealing (not Linux)
    the bytes go to a private file instead.
    """
    if isinstance(model, bytes) and sealing_available():
        model = SealedFile.of_bytes(model)
    if isinstance(model, SealedFile):
        with model.path() as path:
            return _session_at(path, options)
    with tempfile.TemporaryDirectory(prefix="sd-load-") as folder:
        path = os.path.join(folder, "model.onnx")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(model)
        return _session_at(path, options)


def _session_at(path: str, options: ort.SessionOptions) -> ort.InferenceSession:
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=4)
def _tokenizer(tokenizer_json: str) -> Tokenizer:
    """Parsed once per distinct tokenizer.json: versions nearly always share theirs, and
    parsing holds the GIL for ~20 ms, a stall for every request on the event loop.
    Encoding is read-only, so sessions may share one (``TextEncoder`` configures it once)."""
    return Tokenizer.from_str(tokenizer_json)


@functools.lru_cache(maxsize=4)
def _encoder(tokenizer_json: str, max_length: int) -> TextEncoder:
    """One encoder per (tokenizer, max_length): read-only, so sessions share it."""
    return TextEncoder(_tokenizer(tokenizer_json), max_length)


@functools.lru_cache(maxsize=4)
def _canned(encoder: TextEncoder) -> tuple[Batch, ...]:
    """:data:`CANNED_DIALOGUES` encoded by ``encoder``: all together, then the first two
    alone (the warm-up at batch 1). Encoding the over-long ones holds the GIL for ~6 ms,
    a stall of every request, so it happens once per encoder, not once per load; the
    same encoder always encodes them the same."""
    together = encoder.encode(CANNED_DIALOGUES)
    return together, *(encoder.encode([d]) for d in CANNED_DIALOGUES[:2])


@functools.cache
def _no_external_data_dir() -> str:
    return tempfile.mkdtemp(prefix="sd-no-external-data-")


PAD_SLACK = 1.15
"""Padded tokens a model run may compute per real token. On CPU a run costs about its
tokens: for the MiniLM student (1 thread, batches of 8 synthetic dialogues) one run padded
to the longest row did 375 rows/s, rows alone 437/s, runs of similar length 466-480/s."""


def length_runs(lengths: npt.NDArray[np.integer]) -> list[npt.NDArray[np.intp]]:
    """Row indices grouped, shortest first, so that padding stays within :data:`PAD_SLACK`."""
    runs: list[list[int]] = []
    tokens = 0
    for i in np.argsort(lengths, kind="stable"):
        n = int(lengths[i])
        # ascending order: this row is the longest of its run, so the run pads to n
        if runs and n * (len(runs[-1]) + 1) <= PAD_SLACK * (tokens + n):
            runs[-1].append(int(i))
            tokens += n
        else:
            runs.append([int(i)])
            tokens = n
    return [np.asarray(r, dtype=np.intp) for r in runs]


def softmax(logits: npt.NDArray[np.floating]) -> FloatArray:
    """Row-wise softmax in float32, stable for large logits."""
    x: FloatArray = np.asarray(logits, dtype=np.float32)
    # the ufuncs' own reductions: ndarray.max and .sum add a Python layer to each call
    x = x - np.maximum.reduce(x, axis=1, keepdims=True)
    np.exp(x, out=x)
    x /= np.add.reduce(x, axis=1, keepdims=True)
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
        _dropper()  # started here, where starting a thread is safe, not in __del__
        self._inputs = tuple(i.name for i in session.get_inputs())
        outputs = [o.name for o in session.get_outputs()]
        self._output = OUTPUT_NAME if OUTPUT_NAME in outputs else outputs[0]

    def __del__(self) -> None:
        # Freeing an onnxruntime session (weights, kernels, buffers) takes milliseconds
        # of CPU wherever its last reference drops, mostly on the event loop, after a
        # swap: a stall for every request. The dropping thread frees it instead, at a
        # lower priority. Only a SimpleQueue put here: __del__ may run inside any code
        # (a garbage collection in the middle of a lock held), and that put takes none.
        session = self.__dict__.get("_session")
        if session is not None:
            _DROPS.put(session)

    @classmethod
    def from_version(cls, mv: ModelVersion, settings: ServeSettings) -> StudentSession:
        """Build (not yet verify) a session from a registry version's bytes."""
        trim_heap()  # what the sessions swapped out since the last load left behind
        # mv comes from the registry's load, which checked every file against the manifest
        if not mv.labels:
            raise ModelRejected(f"{mv.version}: empty label list")
        if len(set(mv.labels)) != len(mv.labels):
            raise ModelRejected(f"{mv.version}: duplicate labels")
        try:
            encoder = _encoder(mv.tokenizer_json, mv.max_length)
        except Exception as exc:
            raise ModelRejected(f"{mv.version}: tokenizer.json unusable: {exc}") from exc
        try:
            session = _load_session(mv.content, session_options(settings))
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            raise ModelRejected(f"{mv.version}: onnxruntime cannot load the model: {exc}") from exc
        missing = [i.name for i in session.get_inputs() if i.name not in INPUT_NAMES]
        if missing:
            raise ModelRejected(f"{mv.version}: unexpected model inputs {missing}")
        if not session.get_outputs():
            raise ModelRejected(f"{mv.version}: model has no outputs")
        return cls(session, encoder, version=mv.version, labels=mv.labels, sha256=mv.sha256)

    def predict(self, dialogues: Sequence[Sequence[Turn]]) -> FloatArray:
        """Probabilities ``[len(dialogues), len(labels)]`` (tokenization included).

        Rows of similar length run together (see :func:`length_runs`); each row's answer
        is the one it gets alone, since the attention mask hides padding.
        """
        return self._run(self.encoder.encode(dialogues))

    def _run(self, batch: Batch) -> FloatArray:
        """Probabilities for an encoded batch (see :meth:`predict`)."""
        feed = batch.as_feed()
        if len(batch.input_ids) == 1:  # one row, already as long as it is: run it as is
            (logits,) = self._session.run([self._output], {k: feed[k] for k in self._inputs})
            return softmax(logits)
        lengths = feed["attention_mask"].sum(axis=1)
        parts = []
        for rows in length_runs(lengths):
            width = max(1, int(lengths[rows].max()))  # rows are right-padded
            (logits,) = self._session.run(
                [self._output], {k: feed[k][rows, :width] for k in self._inputs}
            )
            parts.append((rows, np.asarray(logits)))
        out = np.empty((len(lengths), parts[0][1].shape[1]), dtype=np.float32)
        for rows, logits in parts:
            out[rows] = logits
        return softmax(out)

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
            together, *alone = _canned(self.encoder)
            probs = self._run(together)
            for batch in alone:  # warm-up at batch 1, as requests run
                warm = self._run(batch)
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
