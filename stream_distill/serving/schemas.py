"""Request bodies of the serve API, validated by pydantic against the serve limits.

Limits come from :class:`~stream_distill.config.ServeSettings` through the
validation context (``{"limits": Limits(...)}``), so one model class serves
every app whatever its settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from stream_distill.events import Role, Turn


@dataclass(frozen=True, slots=True)
class Limits:
    max_text_chars: int = 2000
    max_turns: int = 20


def _limits(info: ValidationInfo) -> Limits:
    ctx = info.context
    found = ctx.get("limits") if isinstance(ctx, dict) else None
    return found if isinstance(found, Limits) else Limits()


def _check_text(text: str, limits: Limits, *, required: bool) -> str:
    if required and not text.strip():
        raise ValueError("text must not be empty")
    if len(text) > limits.max_text_chars:
        raise ValueError(f"text longer than {limits.max_text_chars} characters")
    return text


class TurnIn(BaseModel):
    """One turn of the dialogue as posted."""

    model_config = ConfigDict(extra="forbid")

    role: Role = Field(default="user", description="user, agent or system.")
    text: str = Field(description="What was said.")


class ClassifyIn(BaseModel):
    """``{"text": ...}`` or ``{"conversation_id": ..., "turns": [...], "deadline_ms": ...}``."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(default=None, description="A single user utterance.")
    conversation_id: str | None = Field(
        default=None, min_length=1, max_length=128, description="Dialogue id (event key)."
    )
    turns: list[TurnIn] | None = Field(
        default=None, description="Dialogue so far, oldest first; the last turn is the user's."
    )
    deadline_ms: float | None = Field(
        default=None, gt=0, le=60_000, description="Latency budget of this request."
    )
    cascade: bool | None = Field(
        default=None,
        description=(
            "Let the teacher answer when the student is unsure and the budget allows"
            " (serve.cascade_enabled); unset: serve.cascade_default."
        ),
    )

    @field_validator("text")
    @classmethod
    def _text(cls, v: str | None, info: ValidationInfo) -> str | None:
        return None if v is None else _check_text(v, _limits(info), required=True)

    @field_validator("turns")
    @classmethod
    def _turns(cls, v: list[TurnIn] | None, info: ValidationInfo) -> list[TurnIn] | None:
        if v is None:
            return None
        limits = _limits(info)
        if not v:
            raise ValueError("turns must not be empty")
        if len(v) > limits.max_turns:
            raise ValueError(f"more than {limits.max_turns} turns")
        if v[-1].role != "user":
            raise ValueError("the last turn must be a user turn")
        for i, turn in enumerate(v):
            try:
                _check_text(turn.text, limits, required=i == len(v) - 1)
            except ValueError as exc:
                raise ValueError(f"turn {i}: {exc}") from None
        return v

    @model_validator(mode="after")
    def _one_of(self) -> ClassifyIn:
        if (self.text is None) == (self.turns is None):
            raise ValueError("give exactly one of 'text' or 'turns'")
        return self

    def dialogue(self) -> tuple[Turn, ...]:
        if self.turns is None:
            return (Turn(role="user", text=self.text or ""),)
        return tuple(Turn(role=t.role, text=t.text) for t in self.turns)


ClassifyArgs = tuple[tuple[Turn, ...], str | None, float | None, bool | None]
"""What :class:`ClassifyIn` carries to the core: dialogue, conversation id, deadline, cascade."""

_FIELDS = frozenset(ClassifyIn.model_fields)
_TURN_FIELDS = frozenset(TurnIn.model_fields)
_ROLES = frozenset(get_args(Role))


def fast_classify_in(body: bytes, limits: Limits) -> ClassifyArgs | None:
    """The common, valid body checked by hand (several times faster than the model).

    ``None`` whenever anything is unusual: the caller then validates with
    :class:`ClassifyIn`, which accepts or refuses it with its own error messages. A body
    accepted here is one :class:`ClassifyIn` accepts, with the same values.
    """
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(raw) is not dict or not raw.keys() <= _FIELDS:
        return None
    cid = raw.get("conversation_id")
    if cid is not None and (type(cid) is not str or not 1 <= len(cid) <= 128):
        return None
    deadline = raw.get("deadline_ms")
    if deadline is not None:
        if type(deadline) not in (int, float) or not 0 < deadline <= 60_000:
            return None
        deadline = float(deadline)
    cascade = raw.get("cascade")
    if cascade is not None and type(cascade) is not bool:
        return None
    text, turns = raw.get("text"), raw.get("turns")
    if (text is None) == (turns is None):
        return None
    if text is not None:
        if type(text) is not str or not text.strip() or len(text) > limits.max_text_chars:
            return None
        return (Turn(role="user", text=text),), cid, deadline, cascade
    if type(turns) is not list or not 1 <= len(turns) <= limits.max_turns:
        return None
    dialogue = []
    for t in turns:
        if type(t) is not dict or not t.keys() <= _TURN_FIELDS:
            return None
        role, said = t.get("role", "user"), t.get("text")
        if type(role) is not str or role not in _ROLES:
            return None
        if type(said) is not str or len(said) > limits.max_text_chars:
            return None
        dialogue.append(Turn(role=role, text=said))
    if dialogue[-1].role != "user" or not dialogue[-1].text.strip():
        return None
    return tuple(dialogue), cid, deadline, cascade
