"""The command line as a user runs it: real processes, a real broker, real HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from stream_distill.bus.broker import EmbeddedBroker, free_port
from stream_distill.data.synthetic import INTENTS
from stream_distill.registry.store import Registry
from stream_distill.testing import publish_bow

# Make torch and transformers unimportable, exactly as on a host where they are not installed.
NO_TORCH = (
    "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
    "from stream_distill.cli import main; sys.exit(main(sys.argv[1:]))"
)


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready")


def test_serve_answers_without_torch(broker: EmbeddedBroker, prefix: str, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    publish_bow(registry, INTENTS)
    port = free_port()
    env = {**os.environ, "SD_KAFKA__TOPIC_PREFIX": prefix}
    cmd = [sys.executable, "-c", NO_TORCH, "serve", "--bootstrap-servers", broker.bootstrap,
           "--registry", str(registry.root), "--port", str(port), "-q"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/v2/health/ready", proc)
        r = httpx.post(f"{base}/v1/classify", json={"text": "where is my order #A12345?"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == "v1" and body["intent"] in INTENTS
        assert 0.0 <= body["confidence"] <= 1.0
        assert httpx.get(f"{base}/metrics").text.count("sd_requests_total") >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0  # a clean, drained exit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_broker_command_serves_until_interrupted(tmp_path: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "stream_distill.cli", "broker", "--port", str(port), "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert f"127.0.0.1:{port}" in line and "memory only" in line
        # it speaks Kafka: another embedded-broker client can reach it
        from stream_distill.bus.broker import _probe_sync

        assert _probe_sync(f"127.0.0.1:{port}")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        assert not _probe_sync(f"127.0.0.1:{port}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
