"""Following one topic from its end (moved to :mod:`stream_distill.bus.tail`; re-exported)."""

from __future__ import annotations

from stream_distill.bus.tail import decode_or_park, tail_topic

__all__ = ["decode_or_park", "tail_topic"]
