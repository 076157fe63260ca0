"""Keeps a scorer on the newest good teacher: teacher-models topic first, store poll as backstop.

Every scorer process self-assigns all partitions of the teacher-models topic (no
consumer group), so each one hears every announcement. A version is verified
(manifest sha256 as announced, every file against the manifest), loaded and
smoke-tested off the scoring path, then offered to the scorer, which takes it
between batches. A version that fails is rejected and the old teacher keeps
scoring; versions only ever move forward.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import numpy as np

from stream_distill.bus.base import Bus, Producer, Record
from stream_distill.bus.tail import decode_or_park, tail_topic
from stream_distill.errors import ModelRejected, RegistryError
from stream_distill.events import TeacherPublished, Turn
from stream_distill.metrics.hooks import Hooks
from stream_distill.teacher.model import TeacherModel
from stream_distill.teacher.store import TeacherStore

log = logging.getLogger(__name__)

_PROBE = (Turn(role="user", text="hello, where is my order?"),)


class _NotYet(RegistryError):
    """The announced version is not (yet) as announced in the store: try again later."""


def version_number(version: str | None) -> int:
    """``"v12"`` → 12; None or anything else sorts first."""
    if version and version[:1] == "v" and version[1:].isdigit():
        return int(version[1:])
    return -1


def check_candidate(current: TeacherModel, candidate: TeacherModel) -> None:
    """ModelRejected unless ``candidate`` keeps every label and scores a probe finitely."""
    lost = [label for label in current.labels if label not in candidate.labels]
    if lost:
        raise ModelRejected(f"labels dropped: {lost}")
    out = candidate.predict([_PROBE], attention=False)
    if out.logits.shape != (1, len(candidate.labels)) or not np.isfinite(out.logits).all():
        raise ModelRejected("probe: logits of the wrong shape or not finite")


class TeacherSwapper:
    """Calls ``offer(model)`` for each newer verified teacher version it learns of."""

    def __init__(
        self,
        store: TeacherStore,
        initial: TeacherModel,
        offer: Callable[[TeacherModel], None],
        *,
        bus: Bus | None,
        producer: Producer | None = None,
        hooks: Hooks | None = None,
        poll_interval_s: float = 30.0,
    ) -> None:
        self.store = store
        self.model = initial  # the newest teacher offered (the scorer takes it between batches)
        self._offer = offer
        self.bus = bus
        self.producer = producer
        self.hooks = hooks or Hooks()
        self.poll_interval_s = poll_interval_s
        # The store version now scoring (None: a teacher from outside the store).
        self.version: str | None = initial.meta.get("store_version")
        self.rejected: set[str] = set()
        self.positioned = asyncio.Event()  # set once announcements from now on are heard
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        if self._tasks:
            return
        if self.bus is not None:
            self._tasks.append(asyncio.create_task(self._consume(), name="sd-teacher-models"))
        else:
            self.positioned.set()
        self._tasks.append(asyncio.create_task(self._poll(), name="sd-teacher-store-poll"))

    async def aclose(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> TeacherSwapper:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def is_newer(self, version: str) -> bool:
        return version_number(version) > version_number(self.version)

    async def consider(self, version: str, sha256: str | None = None) -> bool:
        """Take ``version`` if it is newer and sound; True when the scorer will score with it."""
        async with self._lock:  # the topic and the poll may name the same version at once
            if not self.is_newer(version) or version in self.rejected:
                return False
            try:
                model = await asyncio.to_thread(self._load, version, sha256)
            except _NotYet as exc:
                # Says nothing of the version itself (a lying or early announcement):
                # the store poll may still take it.
                log.warning("teacher version %s not taken now: %s", version, exc)
                self.hooks.on_teacher_swap(version, False, str(exc))
                return False
            except (RegistryError, ModelRejected) as exc:
                self.rejected.add(version)  # a fault of the stored version: never again
                log.warning("teacher version %s rejected: %s", version, exc)
                self.hooks.on_teacher_swap(version, False, str(exc))
                return False
            if model is not None:
                self.model = model
                self._offer(model)
            self.version = version
            log.info("teacher store version %s taken", version)
            self.hooks.on_teacher_swap(version, True)
            return True

    def _load(self, version: str, sha256: str | None) -> TeacherModel | None:
        """The verified teacher; None when it has the weights already scoring."""
        current = self.model
        if sha256 is not None:
            try:
                stored = self.store.manifest_sha256(version)
            except RegistryError as exc:
                raise _NotYet(f"not in the store yet: {exc}") from exc
            if stored != sha256:
                raise _NotYet("announced sha256 differs from the stored manifest")
        manifest = self.store.verify(version, sha256)
        if manifest.get("teacher_version") == current.version:
            return None  # e.g. the updater's seed of the teacher this scorer started with
        model = self.store.load(version, sha256, teacher_id=current.teacher_id)
        check_candidate(current, model)
        return model

    async def converge(self) -> None:
        """Take the newest loadable store version newer than the scoring one."""
        versions = await asyncio.to_thread(self.store.list_versions)
        for version in reversed(versions):
            if not self.is_newer(version):
                return
            if await self.consider(version):
                return

    async def _poll(self) -> None:
        while True:
            try:
                await self.converge()
            except Exception:
                log.exception("teacher store poll failed")
            await asyncio.sleep(self.poll_interval_s)

    async def _consume(self) -> None:
        assert self.bus is not None
        topic = self.bus.topics.teacher_models
        await tail_topic(self.bus, topic, self._on_record, self.positioned)

    async def _on_record(self, record: Record) -> None:
        assert self.bus is not None
        event = await decode_or_park(
            TeacherPublished, record, self.hooks, self.producer, self.bus.topics.dead_letters
        )
        if event is not None and event.teacher_id == self.model.teacher_id:
            await self.consider(event.version, event.sha256)
