"""``stream-distill``: one command per role, plus the embedded broker and the demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from stream_distill.config import Settings

TEACHERS = "teachers"
SERVES = ("serve", "teacher-serve")  # commands that take serve's --host/--port and settings


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap-servers", help="a real Kafka (host:port,...); overrides settings")
    p.add_argument("--registry", help="model registry: a directory or s3://bucket/prefix")
    p.add_argument("--data-dir", type=Path, help="where caches and state live (default .sd)")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="stream-distill", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("broker", help="run the embedded Kafka-compatible broker (memory only)")
    _common(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9092)

    p = sub.add_parser("serve", help="HTTP classify/feedback API over the ONNX student")
    _common(p)
    p.add_argument("--host")
    p.add_argument("--port", type=int)

    p = sub.add_parser("teacher-serve", help="serve's HTTP API over the torch teacher")
    _common(p)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument(
        "--teacher",
        "--teacher-dir",
        dest="teacher",
        required=True,
        help="a bootstrapped teacher directory, or any HF sequence-classification name/path",
    )

    p = sub.add_parser("feedback", help="consume the feedback-raw topic into hard labels")
    _common(p)

    for name, what in (("teacher", "score requests into soft labels"), ("trainer", "distill")):
        p = sub.add_parser(name, help=what)
        _common(p)
        p.add_argument("--teacher-dir", type=Path, required=True, help="a bootstrapped teacher")

    p = sub.add_parser("teacher-updater", help="tune the teacher on hard labels, version it")
    _common(p)
    p.add_argument("--teacher-dir", type=Path, help="seeds an empty teacher store")

    p = sub.add_parser("bootstrap-teacher", help="fine-tune the teacher on labelled data")
    _common(p)
    p.add_argument("--data", required=True, help="CSV (text,label), JSONL, or 'synthetic'")
    p.add_argument("--out", type=Path, help="teacher directory (default <data-dir>/teachers/..)")
    p.add_argument("--base", default=None, help="HF name or path (default: bundled MiniLM-L6)")
    p.add_argument("--epochs", type=int, default=2)

    p = sub.add_parser("demo", help="the whole loop on synthetic traffic, in one command")
    _common(p)
    p.add_argument("--quick", action="store_true", help="a shorter run (about 3 minutes)")
    p.add_argument("--report", type=Path, help="write the JSON report here")
    p.add_argument("--seconds", type=float, help="traffic duration (overrides --quick)")
    p.add_argument("--rate", type=float, help="classify requests per second")

    from stream_distill.replay import cli as replay_cli

    p = sub.add_parser("record", help="tap the requests and hard-labels topics into a replay file")
    _common(p)
    replay_cli.add_record_arguments(p)
    p = sub.add_parser("replay", help="send a replay file back to serve (HTTP) or to the topics")
    _common(p)
    replay_cli.add_replay_arguments(p)
    return ap


def _settings(args: argparse.Namespace) -> Settings:
    from stream_distill.app import with_overrides

    base = Settings()
    data_dir = args.data_dir or base.data_dir
    # --data-dir moves a local registry along with it, never an S3 one set in the env.
    local_registry = args.data_dir and not base.registry.root.startswith("s3://")
    return with_overrides(
        base,
        {
            "kafka.bootstrap_servers": args.bootstrap_servers,
            "data_dir": args.data_dir,
            "registry.root": args.registry or (data_dir / "registry" if local_registry else None),
            "trainer.checkpoint_dir": data_dir / "trainer" if args.data_dir else None,
            "serve.host": getattr(args, "host", None) if args.cmd in SERVES else None,
            "serve.port": getattr(args, "port", None) if args.cmd in SERVES else None,
        },
    )


def _logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("aiokafka", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _broker(args: argparse.Namespace, settings: Settings) -> int:
    from stream_distill.bus.base import Topics
    from stream_distill.bus.broker import EmbeddedBroker

    # The topics exist from the start, so clients that outlive a broker restart find them.
    topics = Topics(settings.kafka.topic_prefix).all()
    with EmbeddedBroker(
        args.host, args.port, topics=topics, partitions=settings.kafka.partitions
    ) as b:
        print(f"broker ready on {b.bootstrap} (memory only: a restart loses the data)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def _bootstrap_teacher(args: argparse.Namespace, settings: Settings) -> int:
    from stream_distill.teacher.cli import bootstrap_from_args

    out = bootstrap_from_args(
        args.data, args.out, settings, base=args.base, epochs=args.epochs, quiet=args.quiet
    )
    print(out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _logging(args)
    # Weights come from packages or paths; model loading stays quiet unless asked.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    settings = _settings(args)
    if args.cmd == "broker":
        return _broker(args, settings)
    if args.cmd == "bootstrap-teacher":
        return _bootstrap_teacher(args, settings)
    if args.cmd == "demo":
        from stream_distill.demo.run import run_demo

        return run_demo(settings, args)
    if args.cmd in ("record", "replay"):
        from stream_distill.replay import cli as replay_cli

        return replay_cli.run(args, settings)
    from stream_distill import app

    if args.cmd == "serve":
        from stream_distill.serving.http import run as run_http  # uvloop where installed

        run_http(app.run_serve(settings))
    elif args.cmd == "teacher-serve":
        from stream_distill.serving.http import run as run_http
        from stream_distill.teacher.serve import teacher_serve

        run_http(teacher_serve(settings, args.teacher))
    elif args.cmd == "feedback":
        asyncio.run(app.run_feedback(settings))
    elif args.cmd == "teacher":
        asyncio.run(app.run_teacher(settings, args.teacher_dir))
    elif args.cmd == "trainer":
        asyncio.run(app.run_trainer(settings, args.teacher_dir))
    elif args.cmd == "teacher-updater":
        asyncio.run(app.run_teacher_updater(settings, args.teacher_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
