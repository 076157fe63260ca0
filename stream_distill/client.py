"""A client of serve for chatbots: ``classify`` a user turn, send the confirmed intent back.

::

    with Client("http://serve:8000", feedback_token=token) as sd:
        answer = sd.classify(turns=history, conversation_id="c1")
        ...
        sd.feedback(answer.request_id, confirmed_intent)

:class:`AsyncClient` has the same methods as coroutines. Every call has one
deadline (``timeout_s``, per client or per call) that bounds the whole call,
retries included: no attempt runs and no wait sleeps past it. 429, 503 and
connection failures are retried, after the server's ``Retry-After`` when it
gives one, else after an exponential backoff with jitter; a wait that would
leave no time for another attempt fails at once with :class:`DeadlineExceeded`.
Feedback is retried with the same ``feedback_id`` (made here when not given),
so the server's de-duplication makes retries safe.

Errors::

    StreamDistillError
    └── ClientError          a call that did not succeed (.status, .reason)
        ├── Unauthorized     401: missing or wrong feedback token
        ├── Unavailable      retries used up on 429/503/connection failures
        └── DeadlineExceeded the call's deadline passed
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from stream_distill.errors import StreamDistillError
from stream_distill.events import HardLabelSource, Turn

RETRY_STATUSES = frozenset({429, 503})
USER_AGENT = "stream-distill-client/1"
FeedbackSource = HardLabelSource
TurnLike = Turn | Mapping[str, str]


class _Result(BaseModel):
    # extra="ignore": a newer server may answer more fields than this client knows.
    model_config = ConfigDict(frozen=True, extra="ignore", use_attribute_docstrings=True)


class TopIntent(_Result):
    """One of the most probable intents."""

    intent: str
    p: float


class Classification(_Result):
    """serve's answer to one user turn."""

    request_id: str
    """Quote it in :meth:`Client.feedback`."""
    intent: str
    confidence: float
    top: tuple[TopIntent, ...]
    """The most probable intents, most probable first."""
    model_version: str
    latency_ms: float
    """Time spent inside serve (the round trip is longer)."""


class FeedbackReceipt(_Result):
    """The broker holds the label once this is returned."""

    feedback_id: str
    duplicate: bool = False
    """True when the server had already accepted this ``feedback_id``."""


class ClientError(StreamDistillError):
    """A call that did not succeed: ``status`` (None without an HTTP answer) and ``reason``."""

    def __init__(self, reason: str, status: int | None = None, *, attempts: int = 1) -> None:
        tried = f" (after {attempts} attempts)" if attempts > 1 else ""
        super().__init__(f"{status} {reason}{tried}" if status is not None else reason + tried)
        self.status = status
        self.reason = reason
        self.attempts = attempts


class Unauthorized(ClientError):
    """The feedback token is missing or not one serve knows."""


class Unavailable(ClientError):
    """serve kept answering 429/503, or could not be reached, until the retries ran out."""


class DeadlineExceeded(ClientError):
    """The call's deadline passed (or would have before the next attempt could start)."""


def _reason(response: httpx.Response) -> str:
    try:
        detail = response.json()["detail"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase
    if isinstance(detail, list):  # 422: one entry per invalid field
        return "; ".join(f"{d.get('loc')}: {d.get('msg')}" for d in detail if isinstance(d, dict))
    return str(detail)


def _retry_after(response: httpx.Response) -> float | None:
    # serve sends seconds; the rare HTTP-date form falls back to the client's own backoff.
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


class _Call:
    """The deadline and retry schedule of one call, shared by both clients; it does no I/O."""

    def __init__(self, client: _BaseClient[Any, Any], timeout_s: float | None) -> None:
        self.client = client
        self.end = time.monotonic() + (client.timeout_s if timeout_s is None else timeout_s)
        self.attempts = 0
        self.last = "no attempt made"
        self.last_status: int | None = None

    def timeout(self) -> httpx.Timeout:
        """The httpx timeout of the next attempt: whatever is left of the deadline."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise self._expired()
        self.attempts += 1
        return httpx.Timeout(left)

    def failed(self, outcome: httpx.Response | httpx.TransportError) -> float:
        """Seconds to wait after an unsuccessful answer or exchange, or raise."""
        if isinstance(outcome, httpx.TransportError):
            self.last, self.last_status = f"{type(outcome).__name__}: {outcome}".rstrip(": "), None
            if isinstance(outcome, httpx.TimeoutException) and time.monotonic() >= self.end - 1e-3:
                raise self._expired() from outcome
            return self._wait(None, outcome)
        status = outcome.status_code
        self.last, self.last_status = _reason(outcome), status
        if status == 401:
            raise Unauthorized(self.last, status, attempts=self.attempts)
        if status not in RETRY_STATUSES:
            raise ClientError(self.last, status, attempts=self.attempts)
        return self._wait(_retry_after(outcome), None)

    def _wait(self, retry_after: float | None, cause: Exception | None) -> float:
        c = self.client
        if self.attempts > c.retries:
            raise Unavailable(self.last, self.last_status, attempts=self.attempts) from cause
        if retry_after is None:
            span = min(c.max_backoff_s, c.backoff_s * 2.0 ** (self.attempts - 1))
            delay = span / 2 + c.rng.uniform(0, span / 2)
        else:
            delay = retry_after
        # Waiting only to fail at the deadline helps nobody: fail now and say why.
        if time.monotonic() + delay >= self.end:
            raise self._expired() from cause
        return delay

    def _expired(self) -> DeadlineExceeded:
        reason = f"deadline passed; last: {self.last}"
        return DeadlineExceeded(reason, self.last_status, attempts=self.attempts)


# --- the clients --------------------------------------------------------------------------

R = TypeVar("R", bound=_Result)
H = TypeVar("H", httpx.Client, httpx.AsyncClient)
T = TypeVar("T", httpx.BaseTransport, httpx.AsyncBaseTransport)


# path, body, headers, answer type
_Request = tuple[str, dict[str, Any], dict[str, str], type[R]]


class _BaseClient(Generic[H, T]):
    """Options and request building of both clients; the subclasses only do the I/O.

    ``timeout_s`` is the default deadline of a whole call, retries included;
    ``retries`` the extra attempts after the first; ``backoff_s`` the first
    backoff, doubled per attempt up to ``max_backoff_s`` (``seed`` fixes its
    jitter). ``feedback_token`` is sent as the bearer token of feedback. ``http``
    (an httpx client, left open here) or ``transport`` replace the connection
    pool, e.g. to add TLS settings or, in tests, an ``httpx.MockTransport``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        feedback_token: str | None = None,
        timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
        seed: int | None = None,
        http: H | None = None,
        transport: T | None = None,
    ) -> None:
        if timeout_s <= 0 or retries < 0 or backoff_s < 0 or max_backoff_s < 0:
            raise ValueError("timeout_s must be > 0; retries, backoff_s, max_backoff_s >= 0")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.rng = random.Random(seed)
        self._headers = {"user-agent": USER_AGENT}
        auth = {} if feedback_token is None else {"authorization": f"Bearer {feedback_token}"}
        self._feedback_headers = self._headers | auth
        self._owned = http is None
        self._http: H = http if http is not None else self._new_http(transport)

    def _new_http(self, transport: T | None) -> H:
        raise NotImplementedError

    def _classify_request(
        self,
        text: str | None,
        turns: Sequence[TurnLike] | None,
        conversation_id: str | None,
        deadline_ms: float | None,
    ) -> _Request[Classification]:
        if (text is None) == (turns is None):
            raise ValueError("give exactly one of text or turns")
        body: dict[str, Any] = (
            {"text": text} if turns is None else {"turns": [_turn(t) for t in turns]}
        )
        if conversation_id is not None:
            body["conversation_id"] = conversation_id
        if deadline_ms is not None:
            body["deadline_ms"] = deadline_ms
        return "/v1/classify", body, self._headers, Classification

    def _feedback_request(
        self, request_id: str, intent: str, feedback_id: str | None, source: FeedbackSource
    ) -> _Request[FeedbackReceipt]:
        body = {
            # Made once per call, before the first attempt: every retry carries the same id.
            "feedback_id": feedback_id or uuid.uuid4().hex,
            "request_id": request_id,
            "intent": intent,
            "source": source,
        }
        return "/v1/feedback", body, self._feedback_headers, FeedbackReceipt


def _turn(t: TurnLike) -> dict[str, str]:
    if isinstance(t, Turn):
        return {"role": t.role, "text": t.text}
    return {"role": t.get("role", "user"), "text": t["text"]}


def _parse(kind: type[R], response: httpx.Response, call: _Call) -> R:
    try:
        return kind.model_validate_json(response.content)
    except ValidationError as exc:
        raise ClientError(
            f"unexpected answer: {exc.error_count()} invalid field(s)",
            response.status_code,
            attempts=call.attempts,
        ) from exc


class Client(_BaseClient[httpx.Client, httpx.BaseTransport]):
    """Blocking client of serve: ``with Client(url) as sd: ...`` (or call :meth:`close`)."""

    def _new_http(self, transport: httpx.BaseTransport | None) -> httpx.Client:
        return httpx.Client(transport=transport)

    def classify(
        self,
        text: str | None = None,
        *,
        turns: Sequence[TurnLike] | None = None,
        conversation_id: str | None = None,
        deadline_ms: float | None = None,
        timeout_s: float | None = None,
    ) -> Classification:
        """The intent of ``text``, or of the last (user) turn of ``turns`` in their context.

        ``deadline_ms``: serve's latency budget for the model (it counts misses);
        ``timeout_s``: this call's deadline, instead of the client's."""
        return self._post(
            self._classify_request(text, turns, conversation_id, deadline_ms), timeout_s
        )

    def feedback(
        self,
        request_id: str,
        intent: str,
        *,
        feedback_id: str | None = None,
        source: FeedbackSource = "user_confirmed",
        timeout_s: float | None = None,
    ) -> FeedbackReceipt:
        """Tell serve the true intent of the request ``request_id``."""
        return self._post(
            self._feedback_request(request_id, intent, feedback_id, source), timeout_s
        )

    def _post(self, request: _Request[R], timeout_s: float | None) -> R:
        path, body, headers, kind = request
        call = _Call(self, timeout_s)
        while True:
            try:
                response = self._http.post(
                    self.base_url + path, json=body, headers=headers, timeout=call.timeout()
                )
                if response.is_success:
                    return _parse(kind, response, call)
                delay = call.failed(response)
            except httpx.TransportError as exc:
                delay = call.failed(exc)
            time.sleep(delay)

    def close(self) -> None:
        if self._owned:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_BaseClient[httpx.AsyncClient, httpx.AsyncBaseTransport]):
    """The asyncio twin of :class:`Client`: ``async with AsyncClient(url) as sd: ...``."""

    def _new_http(self, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=transport)

    async def classify(
        self,
        text: str | None = None,
        *,
        turns: Sequence[TurnLike] | None = None,
        conversation_id: str | None = None,
        deadline_ms: float | None = None,
        timeout_s: float | None = None,
    ) -> Classification:
        """See :meth:`Client.classify`."""
        return await self._post(
            self._classify_request(text, turns, conversation_id, deadline_ms), timeout_s
        )

    async def feedback(
        self,
        request_id: str,
        intent: str,
        *,
        feedback_id: str | None = None,
        source: FeedbackSource = "user_confirmed",
        timeout_s: float | None = None,
    ) -> FeedbackReceipt:
        """See :meth:`Client.feedback`."""
        return await self._post(
            self._feedback_request(request_id, intent, feedback_id, source), timeout_s
        )

    async def _post(self, request: _Request[R], timeout_s: float | None) -> R:
        path, body, headers, kind = request
        call = _Call(self, timeout_s)
        while True:
            try:
                response = await self._http.post(
                    self.base_url + path, json=body, headers=headers, timeout=call.timeout()
                )
                if response.is_success:
                    return _parse(kind, response, call)
                delay = call.failed(response)
            except httpx.TransportError as exc:
                delay = call.failed(exc)
            await asyncio.sleep(delay)

    async def aclose(self) -> None:
        if self._owned:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
