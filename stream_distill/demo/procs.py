"""Each role as its own OS process, the way they run in production."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from stream_distill.bus.broker import _die_with_parent


class RoleFailed(RuntimeError):
    pass


class RoleProcesses:
    def __init__(self, run_dir: Path, bootstrap: str, registry: Path, env: dict[str, str]) -> None:
        self.run_dir = run_dir
        self.log_dir = run_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.bootstrap = bootstrap
        self.registry = registry
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **env}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, role: str, *extra: str) -> None:
        cmd = [
            sys.executable,
            "-m",
            "stream_distill.cli",
            role,
            "--bootstrap-servers",
            self.bootstrap,
            "--registry",
            str(self.registry),
            "--data-dir",
            str(self.run_dir),
            *extra,
        ]
        log = open(self.log_dir / f"{role}.log", "wb")  # noqa: SIM115 - lives with the process
        self.procs[role] = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            preexec_fn=_die_with_parent,
        )

    def check_alive(self) -> None:
        for role, p in self.procs.items():
            if p.poll() is not None:
                tail = self.tail(role)
                raise RoleFailed(f"{role} exited with {p.returncode}:\n{tail}")

    def tail(self, role: str, lines: int = 15) -> str:
        path = self.log_dir / f"{role}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop_all(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every role (each drains and checkpoints), then SIGKILL stragglers."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
