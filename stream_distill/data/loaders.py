"""Labelled dialogues from files: CSV (``text,label``) or JSONL.

JSONL lines are either ``{"text": ..., "label": ...}`` or
``{"turns": [{"role": ..., "text": ...}, ...], "intent": ...}``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from stream_distill.events import Turn

Example = tuple[tuple[Turn, ...], str]


def load_labelled(path: Path) -> list[Example]:
    """Every labelled example in ``path``; a bad line raises ``ValueError`` naming it."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return _csv(path)
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return _jsonl(path)
    raise ValueError(f"{path}: expected a .csv or .jsonl file")


def _csv(path: Path) -> list[Example]:
    out: list[Example] = []
    with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: spreadsheets write a BOM
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: CSV needs the columns text,label")
        for row in reader:
            n = reader.line_num  # physical line: blank lines and quoted newlines count
            text, label = (row["text"] or "").strip(), (row["label"] or "").strip()
            if not text or not label:
                raise ValueError(f"{path}:{n}: empty text or label")
            out.append(((Turn(role="user", text=text),), label))
    return out


def _jsonl(path: Path) -> list[Example]:
    out: list[Example] = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if "turns" in obj:
                    turns = tuple(Turn.model_validate(t) for t in obj["turns"])
                    raw_label = obj.get("intent") or obj["label"]
                else:
                    if obj["text"] is None or not str(obj["text"]).strip():
                        raise ValueError("empty text")
                    turns, raw_label = (Turn(role="user", text=str(obj["text"])),), obj["label"]
                label = "" if raw_label is None else str(raw_label)  # null is no label, not "None"
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: {exc}") from exc
            if not turns or turns[-1].role != "user" or not label:
                raise ValueError(f"{path}:{n}: the last turn must be a user turn with a label")
            out.append((turns, label))
    return out
