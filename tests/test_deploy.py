"""deploy/ stays consistent with the command line it starts."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from stream_distill.cli import _parser

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_compose_parses_and_every_role_command_is_valid() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "serve", "teacher", "teacher-updater", "trainer"} <= set(services)
    parser = _parser()
    for name, svc in services.items():
        if not svc["image"].startswith("stream-distill"):
            continue  # third-party images: kafka, prometheus, grafana
        cmd = svc["command"]
        assert cmd[0] == "stream-distill", name
        args = parser.parse_args(cmd[1:])  # exits (fails the test) on an unknown flag
        assert args.cmd in {"serve", "teacher", "teacher-updater", "trainer", "bootstrap-teacher"}
        env = svc.get("environment", {})
        if args.cmd != "bootstrap-teacher":
            assert env.get("SD_KAFKA__BOOTSTRAP_SERVERS") == "kafka:9092", name
    assert services["serve"]["image"].endswith("-serve")  # the image without torch
    # The updater writes the teacher store every scorer follows: both name the same one.
    store = services["teacher-updater"]["environment"]["SD_TEACHER__STORE_DIR"]
    assert services["teacher"]["environment"]["SD_TEACHER__STORE_DIR"] == store
    assert any(v.endswith(":/teacher") for v in services["teacher-updater"]["volumes"])


def test_serve_image_carries_no_torch() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    stages = text.split("\nFROM ")
    serve = next(s for s in stages if s.startswith("base AS serve"))
    assert "torch" not in serve and "[train]" not in serve
    cmd = next(line for line in serve.splitlines() if line.startswith("CMD"))
    argv = yaml.safe_load(cmd[3:])
    assert _parser().parse_args(argv[1:]).cmd == "serve"
    assert shlex.join(argv).startswith("stream-distill serve")
