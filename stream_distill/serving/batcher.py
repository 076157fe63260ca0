"""Dynamic micro-batching under deadlines: concurrent requests share one model run.

One task per :class:`~stream_distill.serving.service.ServingCore` takes requests from a
bounded queue, up to ``batch_max_size`` of them or until ``batch_max_wait_us`` has
passed since the first, and hands the batch to an idle one of ``batch_workers`` worker
threads that tokenises and runs it, so the event loop stays free to take the next
requests and, with two workers, two batches run on two cores side by side (onnxruntime
releases the GIL while it runs). While every worker is busy, the next batch queues up,
so under load batches grow on their own even with no wait at all. The one exception: a
lone request on an idle, fast model (batches under :data:`INLINE_MAX_S`) at light load
(the model busy at most :data:`INLINE_MAX_LOAD` of the time between arrivals) runs on
the event loop, since the two thread hops would cost it more than anyone waits
meanwhile; with no ``batch_max_wait_us`` it runs in the request's own task, without
even the queue and the batch task's wake-up, once no other request turned up while it
yielded to the loop once. Under heavier load the loop must stay free to read the next requests while
the model runs, or batches never form: those go to the workers.

Each batch reads the current session once, after it is formed: every answer in it
names that one version, and a request that arrived after a swap is never answered by
the model swapped out.

Deadlines are absolute times on the injected clock. With the ``reject`` policy a
request is refused with :class:`DeadlineExceeded` as soon as it is clear it cannot be
answered in time: on arrival (the work queued ahead of it plus its own batch exceeds
what is left), when its batch forms (less left than a batch takes), and at the
deadline itself if it is still waiting. Service time is an EWMA of recent batch
latencies, and the expected wait counts the workers. A request arriving at an idle model
always runs, however slow recent batches were, so the estimate keeps learning instead of
locking every request out.
With ``late_ok`` every admitted request is answered, late if need be. A full queue
refuses with :class:`Overloaded` under either policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from stream_distill.config import ServeSettings
from stream_distill.errors import DeadlineExceeded, NotReady, Overloaded
from stream_distill.events import Turn
from stream_distill.metrics.hooks import Hooks
from stream_distill.serving.predictor import Predictor
from stream_distill.serving.session import FloatArray

EWMA_ALPHA = 0.2
"""Weight of the newest batch in the service-time estimate (about the last 10 batches)."""

INLINE_MAX_S = 0.005
"""Longest recent batch time at which a lone request on an idle model runs on the loop."""

INLINE_MAX_LOAD = 0.5
"""Highest service time / mean gap between arrivals at which requests may run inline."""


@dataclass(frozen=True, slots=True)
class Answer:
    """One request's probabilities and the session (hence version) that produced them."""

    session: Predictor
    probs: FloatArray


@dataclass(eq=False, slots=True)
class _Pending:
    dialogue: Sequence[Turn]
    deadline: float
    probe: bool
    future: asyncio.Future[Answer] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Batcher:
    """Queue, batch former and worker thread; ``start()``/``aclose()``, then :meth:`run`."""

    def __init__(
        self,
        current: Callable[[], Predictor | None],
        settings: ServeSettings,
        hooks: Hooks,
        clock: Callable[[], float],
    ) -> None:
        self._current = current
        self.max_size = settings.batch_max_size
        self.max_wait_s = settings.batch_max_wait_us / 1e6
        self.reject_late = settings.deadline_policy == "reject"
        self.hooks = hooks
        self._clock = clock
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(settings.queue_max)
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.workers = settings.batch_workers
        self._pool: list[_Worker] = []
        self._idle: list[_Worker] = []
        self._worker_free = asyncio.Event()
        self._running: dict[int, tuple[float, list[_Pending]]] = {}
        """Batches on a worker now: start time and requests, by batch number."""
        self._batches = 0
        self._inflight: list[_Pending] = []
        """The batch being formed (or run inline): aclose() fails what it holds."""
        self.service_s = 0.0
        """EWMA of batch latency in seconds (0 until the first batch ran)."""
        self.gap_s = math.inf
        """EWMA of the time between request arrivals in seconds."""
        self._last_arrival: float | None = None
        self._deciding = False
        """A lone request yields once before it runs inline (see :meth:`run`)."""

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the batch task (idempotent; needs a running event loop)."""
        if self._task is not None and not self._task.done():
            return
        # Threads of their own: model loads and other to_thread work never delay a batch.
        if not self._pool:
            self._pool = [_Worker(f"sd-batch_{i}") for i in range(self.workers)]
            self._idle = list(self._pool)
        self._task = asyncio.create_task(self._loop(), name="sd-batcher")

    async def aclose(self) -> None:
        """Stop batching; requests still queued get :class:`NotReady`."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        # Nobody else would ever answer these: the task that held them is gone.
        running = [p for _, batch in self._running.values() for p in batch]
        queued = (self._queue.get_nowait() for _ in range(self.queued))
        for p in [*self._inflight, *running, *queued]:
            _fail(p, NotReady("serve is shutting down"))
        self._inflight = []
        self._running.clear()
        for worker in self._pool:
            worker.close()
        self._pool, self._idle = [], []

    # -- state -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """A batch is on the model now."""
        return bool(self._running)

    @property
    def queued(self) -> int:
        """Requests waiting for a batch."""
        return self._queue.qsize()

    # -- requests ----------------------------------------------------------------------
    def expected_wait_s(self) -> float:
        """Seconds until a request queued now would have its answer (the estimate)."""
        ahead = self._queue.qsize() // self.max_size  # full batches before this one's
        left = 0.0  # until a worker is free
        if len(self._running) >= self.workers:
            first = min(start for start, _ in self._running.values())
            left = max(0.0, self.service_s - (self._clock() - first))
        rounds = ahead // self.workers + 1  # the workers take the batches ahead side by side
        return left + rounds * self.service_s

    async def run(self, dialogue: Sequence[Turn], deadline: float) -> Answer:
        """Queue ``dialogue`` and wait for its answer, within ``deadline`` (clock seconds)."""
        self.start()
        self._arrival(self._clock())
        if self.max_wait_s == 0 and self._inline_ok():
            # Requests read in the same pass of the loop (a burst) enter run() once this
            # task yields, see it deciding and queue up; then this one joins them.
            self._deciding = True
            try:
                await asyncio.sleep(0)
            finally:
                self._deciding = False
            if self._inline_ok():
                return self._run_inline(dialogue)
        idle = not self._running and self._queue.empty()
        if self.reject_late and not idle:
            expected = self.expected_wait_s()
            if deadline - self._clock() < expected:
                raise DeadlineExceeded(
                    f"expected wait {expected * 1e3:.0f} ms exceeds the budget left",
                    _retry_after(expected),
                )
        pending = _Pending(dialogue, deadline, probe=idle)
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise Overloaded(
                f"{self._queue.maxsize} requests already wait", _retry_after(self.expected_wait_s())
            ) from None
        self._arrived.set()
        # One timer fails the request at its deadline (cheaper than wait_for + shield).
        timer = (
            asyncio.get_running_loop().call_later(
                max(0.0, deadline - self._clock()), self._expire, pending
            )
            if self.reject_late
            else None
        )
        try:
            return await pending.future
        finally:
            if timer is not None:
                timer.cancel()
            # Given up on (deadline, or the caller went away): the batcher skips it.
            pending.future.cancel()

    def _arrival(self, now: float) -> None:
        last, self._last_arrival = self._last_arrival, now
        if last is not None:
            gap = now - last
            self.gap_s = (
                gap
                if math.isinf(self.gap_s)
                else (EWMA_ALPHA * gap + (1 - EWMA_ALPHA) * self.gap_s)
            )

    def _inline_ok(self) -> bool:
        """A lone request may run on the loop: nothing queued or running, a fast model,
        light load."""
        return (
            not self._running
            and not self._deciding
            and self._queue.empty()
            and 0 < self.service_s <= INLINE_MAX_S
            and self.service_s <= INLINE_MAX_LOAD * self.gap_s
        )

    def _run_inline(self, dialogue: Sequence[Turn]) -> Answer:
        """Answer a lone request in its own task, on the loop: no queue, future or wake-up.

        Nothing can happen meanwhile (no await), so no deadline check, timer or swap race:
        the session read here answers it.
        """
        session = self._current()
        if session is None:
            raise NotReady("no model loaded")
        t0 = self._clock()
        (row,) = _predict(session, [dialogue])
        self._observe(self._clock() - t0)
        self.hooks.on_batch(1)
        if isinstance(row, Exception):
            raise row
        return Answer(session, row)

    def _expire(self, pending: _Pending) -> None:
        _fail(
            pending,
            DeadlineExceeded("no answer within the deadline", _retry_after(self.expected_wait_s())),
        )

    # -- the batch task ----------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._idle:  # every worker busy: the queue fills the next batch
                self._worker_free.clear()
                await self._worker_free.wait()
            batch = self._admit(await self._collect())
            self._inflight = []
            if not batch:
                continue
            session = self._current()
            if session is None:
                for p in batch:
                    _fail(p, NotReady("no model loaded"))
                continue
            t0 = self._clock()
            if len(batch) == 1 and self._inline_ok():  # nobody waits: skip the thread hops
                self._inflight = batch
                rows = _predict(session, [p.dialogue for p in batch])
                self._inflight = []
                self._finish(batch, rows, session, self._clock() - t0)
            else:
                worker = self._idle.pop()
                self._batches += 1
                number = self._batches
                self._running[number] = (t0, batch)
                future = worker.run(loop, session, [p.dialogue for p in batch])
                future.add_done_callback(functools.partial(self._ran, number, worker, session, t0))
            # Idle until the next batch: holding on would keep a swapped-out model alive.
            del session, batch

    def _ran(
        self,
        number: int,
        worker: _Worker,
        session: Predictor,
        t0: float,
        future: asyncio.Future[Rows],
    ) -> None:
        """A worker's batch is done (or failed): answer it, free the worker."""
        entry = self._running.pop(number, None)
        if worker in self._pool:  # not closed meanwhile
            self._idle.append(worker)
            self._worker_free.set()
        if entry is None:  # aclose() answered it already
            return
        batch = entry[1]
        if future.cancelled():
            rows: Rows = [NotReady("serve is shutting down")] * len(batch)
        elif (exc := future.exception()) is not None:
            rows = [exc if isinstance(exc, Exception) else RuntimeError(str(exc))] * len(batch)
        else:
            rows = future.result()
        self._finish(batch, rows, session, self._clock() - t0)

    def _finish(self, batch: list[_Pending], rows: Rows, session: Predictor, took_s: float) -> None:
        self._observe(took_s)
        self.hooks.on_batch(len(batch))
        _settle(batch, rows, session)

    def _observe(self, took_s: float) -> None:
        first = self.service_s == 0.0
        self.service_s = (
            took_s if first else EWMA_ALPHA * took_s + (1 - EWMA_ALPHA) * self.service_s
        )

    async def _collect(self) -> list[_Pending]:
        batch = self._inflight = [await self._queue.get()]  # aclose() fails what it holds
        end = asyncio.get_running_loop().time() + self.max_wait_s
        while True:
            self._arrived.clear()
            while len(batch) < self.max_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            left = end - asyncio.get_running_loop().time()
            if len(batch) >= self.max_size or left <= 0:
                return batch
            # Waiting on an event, not on queue.get(): a timed-out get can lose its item.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)

    def _admit(self, batch: list[_Pending]) -> list[_Pending]:
        """Drop requests given up on; refuse those this batch would answer too late."""
        now = self._clock()
        admitted = []
        for p in batch:
            if p.future.done():
                continue
            if self.reject_late and not p.probe and p.deadline - now < self.service_s:
                _fail(p, DeadlineExceeded("deadline too close when its batch formed"))
                continue
            admitted.append(p)
        return admitted


Rows = list[FloatArray | Exception]


class _Worker:
    """The thread that runs batches: one queue in, one loop callback out per batch.

    Lighter than ``run_in_executor`` (no executor future chained to the loop's), which
    the event loop pays once per batch, so at light load once per request.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def run(
        self,
        loop: asyncio.AbstractEventLoop,
        session: Predictor,
        dialogues: Sequence[Sequence[Turn]],
    ) -> asyncio.Future[Rows]:
        future: asyncio.Future[Rows] = loop.create_future()
        self._jobs.put((loop, future, session, dialogues))
        return future

    def close(self) -> None:
        """Stop once the batch in hand (if any) is done; batches not started never run."""
        while True:
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
        self._jobs.put(None)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, session, dialogues = job
            del job
            try:
                rows: Rows | None = _predict(session, dialogues)
                error: BaseException | None = None
            except BaseException as exc:  # _predict catches Exception; this is worse
                rows, error = None, exc
            # Nothing of the batch stays here: a swapped-out model must be freed at once.
            del session, dialogues
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(_resolve, future, rows, error)
            del loop, future, rows, error


def _resolve(future: asyncio.Future[Rows], rows: Rows | None, error: BaseException | None) -> None:
    if future.done():  # cancelled: the batch task went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert rows is not None
        future.set_result(rows)


def _predict(
    session: Predictor, dialogues: Sequence[Sequence[Turn]]
) -> list[FloatArray | Exception]:
    """One row (or the error) per dialogue; one bad input fails only its own request."""
    try:
        return list(session.predict(dialogues))
    except Exception as exc:
        if len(dialogues) == 1:
            return [exc]
    out: list[FloatArray | Exception] = []
    for d in dialogues:
        try:
            out.append(session.predict([d])[0])
        except Exception as exc:
            out.append(exc)
    return out


def _settle(
    batch: list[_Pending], rows: Sequence[FloatArray | Exception], session: Predictor
) -> None:
    for p, row in zip(batch, rows, strict=True):
        if p.future.done():
            continue
        if isinstance(row, Exception):
            p.future.set_exception(row)
        else:
            p.future.set_result(Answer(session, row))


def _fail(p: _Pending, exc: Exception) -> None:
    if not p.future.done():
        p.future.set_exception(exc)


def _retry_after(expected_s: float) -> float:
    """Whole seconds (what ``Retry-After`` carries), at least one."""
    return float(max(1, math.ceil(expected_s)))
