"""Request ids this replica answered recently, and the labels that answered them.

serve calls :meth:`KnownRequests.record` once per ``/v1/classify`` answer; the
feedback collector asks :meth:`KnownRequests.get` whether a request id is one it
may accept feedback for (the join window) and which label list the intent must
come from. Bounded twice: at most ``capacity`` entries (least recently answered
dropped first) and none older than ``ttl_s``. Memory only: a restart or another
replica forgets, which is what ``serve.feedback_unknown_request`` is for.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Served:
    """How a request was answered."""

    model_version: str
    labels: tuple[str, ...]
    at: float


class KnownRequests:
    """A bounded LRU with a TTL: request id → :class:`Served`."""

    def __init__(
        self,
        capacity: int = 100_000,
        ttl_s: float = 3600.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, Served] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, request_id: str, model_version: str, labels: tuple[str, ...]) -> None:
        # Label tuples are shared with the session that produced them: no copy per answer.
        self._entries[request_id] = Served(model_version, labels, self._clock())
        self._entries.move_to_end(request_id)
        self._expire()
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def get(self, request_id: str) -> Served | None:
        """The answer to ``request_id`` if it is still inside the window."""
        self._expire()
        return self._entries.get(request_id)

    def _expire(self) -> None:
        # Entries are in answer order, so the expired ones are all at the front.
        horizon = self._clock() - self.ttl_s
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if oldest.at > horizon:
                break
            self._entries.popitem(last=False)
