"""The ``teacher-updater`` role: hard labels in, new teacher versions out.

One process (the store's single writer) follows the requests and hard-labels
topics, joins them by request id into a bounded labelled set with a held-out
slice, and tunes the teacher again (:mod:`.finetune`) when the
:class:`~stream_distill.teacher.labelled.UpdatePolicy` says so: at once when
hard labels name an intent the teacher lacks, otherwise every so many labels or
seconds. A candidate that validates is written to the :class:`TeacherStore` and
announced with a :class:`~stream_distill.events.TeacherPublished` on the
teacher-models topic; every scorer then swaps to it (:mod:`.swap`).

The labelled set lives in memory and is rebuilt from the retained log after a
restart: the consumer has no group and reads from the start. Labels older than
the ``trained_until`` the current version's manifest records are not fresh, so a
restart does not by itself cause an update.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from stream_distill.bus import codec
from stream_distill.bus.base import Bus, Producer, Record
from stream_distill.config import TeacherSettings
from stream_distill.errors import ConfigError, PoisonRecord, RegistryError
from stream_distill.events import HardLabel, RequestEvent, TeacherPublished
from stream_distill.metrics.hooks import Hooks
from stream_distill.models.factory import set_threads
from stream_distill.teacher import soft
from stream_distill.teacher.finetune import Verdict, finetune, validate
from stream_distill.teacher.labelled import Labelled, LabelledSet, UpdatePolicy
from stream_distill.teacher.model import TeacherModel, TeacherOutput
from stream_distill.teacher.store import StoredTeacher, TeacherStore
from stream_distill.teacher.swap import version_number

log = logging.getLogger(__name__)

POLL_MS = 200
MAX_RECORDS = 500


@dataclass(frozen=True)
class UpdateResult:
    """One try: why, what validation said, and the version written (None when rejected)."""

    reason: str
    verdict: Verdict
    version: str | None
    seconds: float


def policy_of(settings: TeacherSettings) -> UpdatePolicy:
    return UpdatePolicy(
        every_labels=settings.update_every_labels,
        every_s=settings.update_every_s,
        new_intent_min=settings.new_intent_min_examples,
        join_min=settings.new_intent_join_examples,
        refresh_until=settings.new_intent_refresh_until,
    )


class TeacherUpdater:
    """Tunes, validates, versions and announces the teacher as hard labels arrive."""

    def __init__(
        self,
        bus: Bus,
        store: TeacherStore,
        settings: TeacherSettings,
        *,
        base: TeacherModel | None = None,
        hooks: Hooks | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bus = bus
        self.store = store
        self.settings = settings
        self.base = base
        self.hooks = hooks or Hooks()
        self.clock = clock
        self.policy = policy_of(settings)
        self.labelled = LabelledSet(
            window=settings.update_join_window,
            max_examples=settings.update_max_examples,
            holdout_fraction=settings.update_holdout_fraction,
        )
        self.current: TeacherModel | None = None
        self.version: str | None = None
        self.trained_until: datetime | None = None
        self.fresh = 0  # tuning labels newer than ``trained_until`` since the last try
        self.tried: dict[str, int] = {}  # new intent -> its count when a try was rejected
        self.added: dict[str, int] = {}  # intent an update added -> its count when last tuned
        self.history: list[UpdateResult] = []
        self.ready = asyncio.Event()  # set once the current teacher is known and reading began
        self._last_try = clock()

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the labels until ``stop`` is set; an update in progress is finished first."""
        set_threads(self.settings.threads)
        topics = self.bus.topics
        await self.bus.ensure_topics(
            [topics.requests, topics.hard_labels, topics.teacher_models, topics.dead_letters]
        )
        consumer = self.bus.consumer(
            [topics.requests, topics.hard_labels], group_id=None, offset_reset="earliest"
        )
        async with self.bus.producer() as producer, consumer:
            await self._start_from_store(producer)
            self._last_try = self.clock()
            self.ready.set()
            while not stop.is_set():
                for record in await consumer.getmany(timeout_ms=POLL_MS, max_records=MAX_RECORDS):
                    self._ingest(record)
                reason = self.due()
                if reason is not None:
                    await self.update(reason, producer)

    # -- state ----------------------------------------------------------------------------------
    @property
    def teacher(self) -> TeacherModel:
        if self.current is None:
            raise RuntimeError("the updater has not started")
        return self.current

    def due(self) -> str | None:
        return self.policy.reason(
            known=self.teacher.labels,
            counts=self.labelled.counts(),
            fresh=self.fresh,
            since_last_s=self.clock() - self._last_try,
            tried=self.tried,
            added=self.added,
        )

    def _is_fresh(self, example: Labelled) -> bool:
        return self.trained_until is None or example.ts > self.trained_until

    def _ingest(self, record: Record) -> None:
        topics = self.bus.topics
        try:
            if record.topic == topics.requests:
                example = self.labelled.add_request(codec.decode(RequestEvent, record.value))
            else:
                example = self.labelled.add_hard(codec.decode(HardLabel, record.value))
        except PoisonRecord as exc:
            # The scorer and the trainer park poison; a reader need only step over it.
            log.debug("skipping %s@%d: %s", record.tp, record.offset, exc)
            return
        if (
            example is not None
            and not self.labelled.is_holdout(example.request_id)
            and self._is_fresh(example)
        ):
            self.fresh += 1

    async def _start_from_store(self, producer: Producer) -> None:
        """The newest loadable store version, or the base teacher written as the first one."""
        for version in reversed(await asyncio.to_thread(self.store.list_versions)):
            try:
                teacher = await asyncio.to_thread(
                    self.store.load, version, teacher_id=self.settings.teacher_id
                )
            except RegistryError as exc:
                log.warning("teacher store version %s unusable: %s", version, exc)
                continue
            self.current, self.version = teacher, version
            until = self.store.read_manifest(version).get("trained_until")
            self.trained_until = datetime.fromisoformat(until) if until else None
            log.info("updating teacher %s (store %s)", teacher.version, version)
            return
        if self.base is None:
            raise ConfigError("the teacher store is empty and no base teacher was given")
        self.current = self.base
        stored = await asyncio.to_thread(self.store.publish, self.base, extra={"reason": "seed"})
        self._adopt(self.base, stored)
        await self._announce(producer, stored, "seed")

    # -- one update -----------------------------------------------------------------------------
    async def update(self, reason: str, producer: Producer) -> UpdateResult:
        """Tune, validate and (if it passes) publish a new version; the loop waits meanwhile."""
        current = self.teacher
        started = time.perf_counter()
        counts = self.labelled.counts()
        new = self.policy.joining(current.labels, counts, self.tried)
        examples = list(self.labelled.train.values())
        known = set(current.labels)
        fresh = [ex for ex in examples if ex.intent not in known or self._is_fresh(ex)]
        replay = [ex for ex in examples if ex.intent in known and not self._is_fresh(ex)]
        holdout = list(self.labelled.holdout.values())
        until = max((ex.ts for ex in examples), default=self.trained_until)
        log.info(
            "teacher update (%s): %d fresh, %d replayed, %d held out, new intents %s",
            reason, len(fresh), len(replay), len(holdout), new or "none",
        )  # fmt: skip
        candidate, verdict = await asyncio.to_thread(
            self._tune, current, fresh, replay, new, holdout
        )
        self._last_try = self.clock()
        self.fresh = 0
        version: str | None = None
        if verdict.accepted and candidate is not None:
            candidate.metrics.update(verdict.metrics)
            extra: dict[str, Any] = {"reason": reason}
            if until is not None:
                extra["trained_until"] = until.isoformat()
            try:
                stored = await asyncio.to_thread(
                    self.store.publish,
                    candidate,
                    parent=self.version,
                    metrics=candidate.metrics,
                    extra=extra,
                )
            except (OSError, RegistryError) as exc:
                log.exception("writing the tuned teacher failed")
                verdict = Verdict(False, f"store: {exc}", verdict.metrics)
            else:
                self._adopt(candidate, stored)
                self.trained_until = until
                self.tried = {i: n for i, n in self.tried.items() if i not in candidate.labels}
                version = stored.version
                await self._announce(producer, stored, reason)
                # new intents, and those added earlier that this update saw more of
                learnt = [i for i in candidate.labels if i not in known or i in self.added]
                learnt = [i for i in learnt if counts.get(i, 0) > self.added.get(i, 0)]
                self.added.update({i: counts[i] for i in learnt})
                if learnt and self.settings.relabel_recent:
                    await self._relabel(candidate, learnt, producer)
                await asyncio.to_thread(self._prune)
        if version is None:
            # Not again at once: a new intent waits for more examples, the rest for the period.
            self.tried.update({i: counts[i] for i in new})
        seconds = time.perf_counter() - started
        log.info(
            "teacher update (%s) %s in %.1fs: %s %s",
            reason, version or "rejected", seconds, verdict.reason, verdict.metrics,
        )  # fmt: skip
        self.hooks.on_teacher_update(reason, version is not None, seconds)
        result = UpdateResult(reason, verdict, version, seconds)
        self.history.append(result)
        return result

    def _tune(
        self,
        current: TeacherModel,
        fresh: list[Labelled],
        replay: list[Labelled],
        new: list[str],
        holdout: list[Labelled],
    ) -> tuple[TeacherModel | None, Verdict]:
        try:
            candidate = finetune(
                current,
                fresh,
                replay,
                self.settings,
                new_labels=new,
                seed=version_number(self.version) + 1,
            )
        except Exception as exc:  # e.g. out of memory: the current teacher keeps scoring
            log.exception("tuning the teacher failed")
            return None, Verdict(False, f"tuning failed: {exc}")
        verdict = validate(
            current,
            candidate,
            holdout,
            margin=self.settings.update_margin,
            min_holdout=self.settings.update_min_holdout,
            z=self.settings.update_significance_z,
        )
        return candidate, verdict

    async def _relabel(self, teacher: TeacherModel, intents: list[str], producer: Producer) -> None:
        """Score the newest requests with ``teacher`` (which just learnt ``intents``, new or
        seen more of) and send soft labels for those it assigns to one of them.

        Without this the student meets a new intent only in requests that arrive after the
        scorers swapped, while the ones already seen keep their old teacher's soft labels,
        which name some other intent. The trainer takes a soft label with a new label set
        as a reason to learn an example again.
        """
        recent = self.labelled.recent(self.settings.relabel_recent)
        if not recent:
            return
        started = time.perf_counter()
        out = await asyncio.to_thread(
            soft.predict,
            teacher,
            [turns for _, _, turns in recent],
            attention=self.settings.emit_attention,
            precision=self.settings.precision,
        )
        wanted = {teacher.labels.index(lab) for lab in intents}
        rows = [i for i, k in enumerate(out.logits.argmax(axis=1)) if int(k) in wanted]
        picked = TeacherOutput(
            logits=out.logits[rows],
            attention=[out.attention[i] for i in rows] if out.attention else [],
        )
        labels = soft.soft_labels(
            teacher, self.settings.teacher_id, [recent[i][0] for i in rows], picked
        )
        topic = self.bus.topics.soft_labels
        try:
            await asyncio.gather(
                *(
                    producer.send(
                        topic,
                        codec.encode(label),
                        key=recent[i][1].encode(),
                        headers=codec.headers_for(label),
                    )
                    for i, label in zip(rows, labels, strict=True)
                )
            )
        except Exception:
            # Best effort: the scorers label what comes next with this version anyway.
            log.exception("sending %d relabelled soft labels failed", len(labels))
            return
        log.info(
            "relabelled %d of the %d newest requests as %s in %.1fs",
            len(labels), len(recent), intents, time.perf_counter() - started,
        )  # fmt: skip
        self.hooks.on_teacher_relabel(len(recent), len(labels))

    def _adopt(self, teacher: TeacherModel, stored: StoredTeacher) -> None:
        teacher.meta["store_version"] = stored.version
        self.current, self.version = teacher, stored.version

    def _prune(self) -> None:
        protect = {self.version} if self.version else set()
        self.store.prune(self.settings.store_keep, protect)

    async def _announce(self, producer: Producer, stored: StoredTeacher, reason: str) -> None:
        m = stored.manifest
        event = TeacherPublished(
            version=stored.version,
            teacher_id=self.settings.teacher_id,
            teacher_version=m["teacher_version"],
            uri=self.store.uri(stored.version),
            sha256=stored.sha256,
            labels=tuple(m["labels"]),
            label_set_version=m["label_set_version"],
            metrics={k: float(v) for k, v in m.get("metrics", {}).items()},
            parent=m.get("parent"),
            reason=reason,
        )
        try:
            await producer.send(
                self.bus.topics.teacher_models,
                codec.encode(event),
                key=event.teacher_id.encode(),
                headers=codec.headers_for(event),
            )
        except Exception:
            # The version is in the store: scorers find it on their next poll.
            log.exception("announcing teacher %s failed", stored.version)
