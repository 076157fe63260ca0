"""Low-priority worker threads: background work that yields the CPU to the hot path.

Linux keeps a nice value per thread, so one thread of a process can run below the
others (serve's model loads, the trainer's replay-only steps). Raising niceness needs
no privilege; where it is not possible (or not Linux) the thread runs at normal priority.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor


def lower_this_thread(nice: int) -> None:
    """Set the calling thread's niceness to ``nice`` (a no-op where that fails)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def low_priority_executor(name: str, nice: int) -> ThreadPoolExecutor:
    """One worker thread named ``name``, at niceness ``nice``."""
    return ThreadPoolExecutor(
        1, thread_name_prefix=name, initializer=lower_this_thread, initargs=(nice,)
    )
