"""``stream-distill bootstrap-teacher``: data in, a versioned teacher directory out."""

from __future__ import annotations

from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from stream_distill.config import Settings
from stream_distill.teacher.bootstrap import bootstrap_teacher
from stream_distill.teacher.model import TeacherModel

SYNTHETIC_EXAMPLES = 2400
# Measured: 32 tokens per turn train twice as fast as 64 and score as well on our dialogues.
TEACHER_MAX_LENGTH = 32


def synthetic_examples(n: int = SYNTHETIC_EXAMPLES, seed: int = 1) -> list[tuple[tuple, str]]:  # type: ignore[type-arg]
    from stream_distill.data.synthetic import labelled_examples

    return [(ex.turns, ex.intent) for ex in labelled_examples(n, seed=seed)]


def teacher(
    examples: list[tuple[tuple, str]],  # type: ignore[type-arg]
    out: Path,
    *,
    base: str,
    max_length: int,
    epochs: int = 2,
    quiet: bool = False,
) -> TeacherModel:
    """Fine-tune (or load from cache) with a progress bar unless ``quiet``."""
    if quiet:
        return bootstrap_teacher(examples, out, base=base, max_length=max_length, epochs=epochs)
    bar = Progress(
        TextColumn("[bold]teacher fine-tune"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    task = bar.add_task("steps", total=None)

    def progress(done: int, total: int) -> None:
        if not bar.live.is_started:  # only when training really happens (not on a cache hit)
            bar.start()
        bar.update(task, completed=done, total=total)

    try:
        return bootstrap_teacher(
            examples, out, base=base, max_length=max_length, epochs=epochs, progress=progress
        )
    finally:
        bar.stop()


def bootstrap_from_args(
    data: str,
    out: Path | None,
    settings: Settings,
    *,
    base: str | None = None,
    epochs: int = 2,
    quiet: bool = False,
) -> Path:
    if data == "synthetic":
        examples = synthetic_examples()
        name = "synthetic"
    else:
        from stream_distill.data.loaders import load_labelled

        examples = list(load_labelled(Path(data)))
        name = Path(data).stem
    target = out or settings.data_dir / "teachers" / name
    model = teacher(
        examples,
        target,
        base=base or settings.model.teacher,
        max_length=TEACHER_MAX_LENGTH,
        epochs=epochs,
        quiet=quiet,
    )
    if not quiet:
        acc = model.metrics.get("holdout_accuracy")
        print(f"teacher {model.version}: {len(model.labels)} labels, held-out accuracy {acc}")
    return target
