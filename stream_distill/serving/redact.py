"""What must not leave serve: personal data masked in request events before they reach Kafka.

The answer is always computed on the original text; only the copy that becomes a
:class:`~stream_distill.events.RequestEvent` is masked. Each rule replaces a match
with a mark (``[email]``, ``[number]``, ``[phone]``, ``[order]`` or ``[<name>]`` of a
custom rule) so downstream readers can tell redacted text from what was said.

Rules run in a fixed order: e-mails first (they hold digits the number rules would
split), then the operator's own formats (order ids, custom patterns), which are more
specific than the generic digit heuristics for cards and phones that come last.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from stream_distill.config import ServeSettings
from stream_distill.errors import ConfigError

# The lookbehinds let a match start only where a run starts: linear time on hostile input.
EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
# Candidates only: a digit count decides (see _phone), so dates, amounts and short ids survive.
PHONE = re.compile(r"(?<![\w+.()-])\+?\(?\d[\d ().-]{6,}\d(?![\w:])")
PHONE_DIGITS = (9, 15)
"""Digits of a phone number: from short national numbers to the E.164 maximum."""

MARK_EMAIL, MARK_CARD, MARK_PHONE, MARK_ORDER = "[email]", "[number]", "[phone]", "[order]"
_NAME = re.compile(r"\w+")


def _phone(match: re.Match[str]) -> str:
    text = match.group(0)
    digits = sum(c.isdigit() for c in text)
    lo, hi = PHONE_DIGITS
    return MARK_PHONE if lo <= digits <= hi else text


@dataclass(frozen=True, slots=True)
class Rule:
    """One mask: every match of ``pattern`` becomes ``mark`` (or what ``replace`` returns)."""

    mark: str
    pattern: re.Pattern[str]
    replace: Callable[[re.Match[str]], str] | None = None

    def apply(self, text: str) -> str:
        return self.pattern.sub(self.replace or self.mark, text)


class Redactor:
    """Applies its rules in order; with no rules it returns the text unchanged."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)

    @property
    def marks(self) -> tuple[str, ...]:
        """What this redactor may leave in place of what it removes."""
        return tuple(dict.fromkeys(r.mark for r in self.rules))

    @classmethod
    def from_settings(cls, settings: ServeSettings) -> Redactor:
        """The rules ``settings`` switch on; :class:`ConfigError` on an unusable pattern."""
        rules: list[Rule] = []
        if settings.redact_emails:
            rules.append(Rule(MARK_EMAIL, EMAIL))
        rules += [
            Rule(MARK_ORDER, _compile("redact_order_ids", p)) for p in settings.redact_order_ids
        ]
        for name, pattern in settings.redact_patterns.items():
            if not _NAME.fullmatch(name):
                raise ConfigError(f"redact_patterns: name {name!r} is not a word")
            rules.append(Rule(f"[{name}]", _compile(f"redact_patterns[{name}]", pattern)))
        if settings.redact_cards:
            rules.append(Rule(MARK_CARD, CARD))
        if settings.redact_phones:
            rules.append(Rule(MARK_PHONE, PHONE, _phone))
        return cls(rules)

    def __call__(self, text: str) -> str:
        for rule in self.rules:
            text = rule.apply(text)
        return text


def _compile(field: str, pattern: str) -> re.Pattern[str]:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{field}: invalid regex {pattern!r}: {exc}") from exc
    if compiled.search(""):
        # A pattern matching nothing would put a mark between every character.
        raise ConfigError(f"{field}: regex {pattern!r} matches the empty string")
    return compiled


DEFAULT = Redactor.from_settings(ServeSettings())


def redact(text: str) -> str:
    """Mask ``text`` with the default rules: e-mails, card numbers, phone numbers."""
    return DEFAULT(text)
