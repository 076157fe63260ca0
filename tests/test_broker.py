"""The embedded broker starts, answers metadata, and never outlives its owner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from stream_distill.bus.broker import EmbeddedBroker, _probe_sync
from stream_distill.errors import BrokerError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); read its state
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_start_answer_stop() -> None:
    with EmbeddedBroker() as b:
        pid = b.pid
        assert pid is not None and _alive(pid)
        assert _probe_sync(b.bootstrap)
    assert not _alive(pid)
    assert not _probe_sync(b.bootstrap)


def test_broker_dies_with_its_parent() -> None:
    code = (
        "from stream_distill.bus.broker import EmbeddedBroker; import time, sys\n"
        "b = EmbeddedBroker().start(); print(b.pid, flush=True); time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    assert _alive(pid)
    parent.send_signal(signal.SIGKILL)  # no chance to clean up
    parent.wait()
    end = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.1)
    assert not _alive(pid), "broker outlived the process that started it"


def test_port_in_use_is_a_clear_error() -> None:
    with EmbeddedBroker() as b, pytest.raises(BrokerError):
        EmbeddedBroker(port=b.port, startup_timeout_s=3).start()
