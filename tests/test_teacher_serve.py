"""teacher-serve in bfloat16: ``teacher.precision`` is honored, over real HTTP.

autocast is per thread, so a precision entered anywhere but the thread that runs the
model would be silently lost: these answers must differ from float32's (a little).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from tokenizers import Tokenizer

from stream_distill.bus.broker import free_port
from stream_distill.config import ServeSettings, Settings
from stream_distill.data.synthetic import INTENTS
from stream_distill.events import Turn
from stream_distill.models.factory import default_tokenizer_json, set_threads, tiny_classifier
from stream_distill.models.text import TextEncoder
from stream_distill.teacher.model import TeacherModel
from stream_distill.teacher.serve import run_teacher_serve, teacher_serve

set_threads(1)

LABELS = tuple(sorted(INTENTS[:6]))
TEXTS = ["where is my parcel?", "cancel it", "hi, I need help with my card please"]


@pytest.fixture(scope="module")
def teacher() -> TeacherModel:
    encoder = TextEncoder(Tokenizer.from_str(default_tokenizer_json()), max_length=32)
    model = tiny_classifier(LABELS, layers=2, hidden=64, heads=2, intermediate=128, seed=7)
    return TeacherModel(model, encoder)


def fp32_probs(teacher: TeacherModel) -> np.ndarray:
    dialogues = [(Turn(role="user", text=t),) for t in TEXTS]
    logits = teacher.predict(dialogues, attention=False).logits.astype(np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


async def classify_all(url: str) -> np.ndarray:
    rows = []
    async with httpx.AsyncClient(base_url=url) as client:
        for text in TEXTS:
            r = await client.post("/v1/classify", json={"text": text})
            assert r.status_code == 200, r.text
            got = {t["intent"]: t["p"] for t in r.json()["top"]}
            rows.append([got[label] for label in LABELS])
    return np.asarray(rows)


def assert_bf16_close(got: np.ndarray, want: np.ndarray) -> None:
    diff = np.abs(got - want).max()
    assert diff < 0.02, diff  # bfloat16 moves probabilities a little ...
    assert diff > 3e-6, diff  # ... but it does move them: autocast was on
    assert (got.argmax(axis=1) == want.argmax(axis=1)).all()


async def test_run_teacher_serve_in_bfloat16(teacher: TeacherModel) -> None:
    want = fp32_probs(teacher)
    async with run_teacher_serve(
        teacher, ServeSettings(), host="127.0.0.1", port=0, precision="bfloat16"
    ) as running:
        got = await classify_all(running.url)
    assert_bf16_close(got, want)
    async with run_teacher_serve(teacher, ServeSettings(), host="127.0.0.1", port=0) as running:
        same = await classify_all(running.url)
    assert np.allclose(same, want, atol=1e-5)  # float32 by default, as before


async def test_teacher_serve_role_honors_teacher_precision(
    teacher: TeacherModel, tmp_path: Path
) -> None:
    directory = teacher.save(tmp_path / "teacher")
    port = free_port()
    settings = Settings(
        teacher={"precision": "bfloat16", "threads": 1},  # type: ignore[arg-type]
        serve={"port": port, "drain_grace_s": 0.0},  # type: ignore[arg-type]
    )
    stop = asyncio.Event()
    role = asyncio.create_task(teacher_serve(settings, str(directory), stop))
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as client:
            for _ in range(300):
                assert not role.done(), role
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/v2/health/ready", timeout=1.0)).status_code == 200:
                        break
                await asyncio.sleep(0.1)
        got = await classify_all(url)
    finally:
        stop.set()
        await asyncio.wait_for(role, 30)
    assert_bf16_close(got, fp32_probs(teacher))
