"""The ``record`` and ``replay`` subcommands: arguments, progress display, exit codes.

``stream_distill.cli`` adds the arguments and hands over the parsed namespace; the work
itself is :func:`.record.record`, :func:`.replay.replay_http` and :func:`.replay.replay_kafka`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from stream_distill.bus.kafka import KafkaBus
    from stream_distill.config import Settings
    from stream_distill.replay.record import RecordStats
    from stream_distill.replay.replay import OnDone
    from stream_distill.replay.summary import ReplaySummary

# Imports of the work itself wait until a command runs: the parser is built for every command.


# -- record ----------------------------------------------------------------------------------
def add_record_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--out", default="-", help="replay file to write ('-': stdout)")
    p.add_argument(
        "--from",
        dest="offset_reset",
        choices=("earliest", "latest"),
        default="earliest",
        help="start at the oldest records or only take new ones",
    )
    p.add_argument("--follow", action="store_true", help="keep recording after catching up")
    p.add_argument("--max-records", type=int, help="stop after this many records")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument(
        "--idle", type=float, default=2.0, help="without --follow: seconds of quiet that end it"
    )
    p.add_argument("--topic-prefix", help="topic prefix (default from settings)")


def record_from_args(args: argparse.Namespace, settings: Settings) -> int:
    """``stream-distill record``: the CLI glue around :func:`.record.record`."""
    from stream_distill.app import stop_on_signals
    from stream_distill.replay.record import RecordOptions, record

    opts = RecordOptions(
        offset_reset=args.offset_reset,
        follow=args.follow,
        max_records=args.max_records,
        duration_s=args.duration,
        idle_s=args.idle,
    )
    bus = bus_for(settings, args.topic_prefix)

    async def main(out: IO[str]) -> RecordStats:
        source = {"bootstrap": bus.bootstrap}
        with _status(args.quiet) as progress:
            return await record(
                bus, out, opts, stop=stop_on_signals(), on_progress=progress, source=source
            )

    if args.out == "-":
        stats = asyncio.run(main(sys.stdout))
    else:
        with Path(args.out).open("w", encoding="utf-8") as fp:
            stats = asyncio.run(main(fp))
    print(stats.describe() + f" (stopped: {stats.stopped_by}) -> {args.out}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _status(quiet: bool) -> Iterator[Callable[[RecordStats], None] | None]:
    if quiet:
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = progress.add_task("recording: waiting for records")

    def update(stats: RecordStats) -> None:
        skipped = sum(stats.poison.values())
        progress.update(
            task,
            description=f"recording: {stats.requests} requests, {stats.labels} labels, "
            f"{skipped} skipped",
        )

    with progress:
        yield update


# -- replay ----------------------------------------------------------------------------------
def add_replay_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="a file written by 'stream-distill record'")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="serve's base URL: replay over HTTP to /v1/classify")
    target.add_argument("--to-kafka", action="store_true", help="produce the events to the topics")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument(
        "--speed", type=float, default=1.0, help="recorded timing sped up this much (inf: no waits)"
    )
    pace.add_argument(
        "--rate", type=float, help="a fixed number per second instead (--to-kafka: labels count)"
    )
    p.add_argument("--concurrency", type=int, default=16, help="most requests in flight")
    p.add_argument("--feedback", action="store_true", help="also post the recorded labels")
    p.add_argument("--feedback-token", help="bearer token for /v1/feedback (implies --feedback)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request")
    p.add_argument("--new-ids", action="store_true", help="--to-kafka: fresh ids and timestamps")
    p.add_argument("--topic-prefix", help="--to-kafka: topic prefix (default from settings)")
    p.add_argument(
        "--expect-same",
        action="store_true",
        help="exit 1 unless every served intent is recorded one",
    )
    p.add_argument("--json", type=Path, help="also write the summary here as JSON")
    p.add_argument(
        "--save", type=Path, help="write the file back with the intents served now (a baseline)"
    )


def bus_for(settings: Settings, topic_prefix: str | None) -> KafkaBus:
    """The bus of ``settings``, under another topic prefix when one is given."""
    from stream_distill.app import make_bus, with_overrides

    return make_bus(with_overrides(settings, {"kafka.topic_prefix": topic_prefix}))


def replay_from_args(args: argparse.Namespace, settings: Settings) -> int:
    """``stream-distill replay``: load, check the options, replay, print (and write) the summary."""
    from stream_distill.app import stop_on_signals
    from stream_distill.replay.format import ReplayFileError, load
    from stream_distill.replay.replay import ReplayOptions, replay_http, replay_kafka, save_baseline

    if args.to_kafka and (args.expect_same or args.feedback or args.feedback_token or args.save):
        print(
            "--expect-same, --feedback and --save need --url (nothing is served with --to-kafka)",
            file=sys.stderr,
        )
        return 2
    try:
        opts = ReplayOptions(
            speed=args.speed,
            rate=args.rate,
            concurrency=args.concurrency,
            feedback=args.feedback or bool(args.feedback_token),
            feedback_token=args.feedback_token,
            timeout_s=args.timeout,
            new_ids=args.new_ids,
            expect_same=args.expect_same,
        )
        replay = load(args.file)
    except (ValueError, ReplayFileError) as exc:
        print(f"stream-distill replay: {exc}", file=sys.stderr)
        return 2
    total = len(replay.requests) + (len(replay.labels) if args.to_kafka else 0)

    async def main() -> ReplaySummary:
        stop = stop_on_signals()
        with _progress_bar(total, args.quiet) as progress:
            if not args.to_kafka:
                return await replay_http(replay, args.url, opts, progress=progress, stop=stop)
            bus = bus_for(settings, args.topic_prefix)
            return await replay_kafka(
                replay, bus, opts, progress=progress, stop=stop, target=bus.bootstrap
            )

    summary = asyncio.run(main())
    print(summary.render())
    if args.json is not None:
        args.json.write_text(json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8")
    if args.save is not None:
        kept = save_baseline(args.save, replay, summary)
        print(f"baseline of {kept} requests written to {args.save}")
    return summary.exit_code()


@contextlib.contextmanager
def _progress_bar(total: int, quiet: bool) -> Iterator[OnDone | None]:
    if quiet:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("replay"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[errors]} errors"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    task = bar.add_task("replay", total=total, errors=0)
    errors = 0

    def advance(ok: bool) -> None:
        nonlocal errors
        errors += not ok
        bar.update(task, advance=1, errors=errors)

    with bar:
        yield advance


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Dispatch a parsed ``record`` or ``replay`` command."""
    return (
        record_from_args(args, settings)
        if args.cmd == "record"
        else replay_from_args(args, settings)
    )
