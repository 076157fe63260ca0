"""Model bytes in a sealed in-memory file: hashed and loaded without a copy in between.

A model is tens of megabytes. Reading it into a Python ``bytes`` object, hashing it,
then writing it to a private file for onnxruntime to load from a path (see
``stream_distill.serving.session``) copies it twice. On Linux a version's model is
copied once instead, by the kernel, from the registry file into an
anonymous memory file (``memfd_create``), which is then sealed: from that moment
nothing, not even this process, can change, grow or shrink it. Its sha256 is computed
from a read-only mapping of those pages, and onnxruntime opens the same file by path,
so what loads is exactly what was hashed. Where sealing is not available the model
stays a plain ``bytes`` object (see :func:`read_model`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import mmap
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

_SEALS = (
    (fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    if fcntl is not None and hasattr(fcntl, "F_SEAL_WRITE")
    else 0
)
_CHUNK = 1 << 30


@functools.cache
def sealing_available() -> bool:
    """True where a sealed memory file can be made and opened by path (Linux)."""
    if not _SEALS or not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd"):
        return False
    try:
        SealedFile.of_bytes(b"probe").close()
    except OSError:
        return False
    return True


class SealedFile:
    """Bytes in an anonymous memory file sealed against every change; owns its descriptor."""

    def __init__(self, fd: int) -> None:
        self._fd = -1
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            self.size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    @staticmethod
    def _new(name: str) -> int:
        return os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)

    @classmethod
    def copy_of(cls, path: Path | str) -> SealedFile:
        """A sealed copy of the file at ``path`` as it is now (kernel copy, up to its end)."""
        fd = cls._new(os.path.basename(path))
        try:
            src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                while os.sendfile(fd, src, None, _CHUNK):
                    pass
            finally:
                os.close(src)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd)

    @classmethod
    def of_bytes(cls, data: bytes, name: str = "model") -> SealedFile:
        """A sealed copy of ``data``."""
        fd = cls._new(name)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.close(fd)
            raise
        return cls(fd)

    def fileno(self) -> int:
        return self._fd

    @contextlib.contextmanager
    def _mapped(self) -> Iterator[mmap.mmap | bytes]:
        if self.size == 0:
            yield b""
            return
        with mmap.mmap(self._fd, self.size, prot=mmap.PROT_READ) as mapped:
            yield mapped

    def sha256(self) -> str:
        """The hex sha256 of the content (hashed in place; the GIL is released meanwhile)."""
        with self._mapped() as data:
            return hashlib.sha256(data).hexdigest()

    def read(self) -> bytes:
        """The content as ``bytes`` (a copy)."""
        with self._mapped() as data:
            return bytes(data)

    @contextlib.contextmanager
    def path(self) -> Iterator[str]:
        """A path that opens this file, alone in a fresh private folder.

        The path is a link named ``model.onnx`` to ``/proc/self/fd/<fd>``; a loader that
        resolves relative names against the path's folder finds nothing else there.
        """
        with tempfile.TemporaryDirectory(prefix="sd-model-") as folder:
            link = os.path.join(folder, "model.onnx")
            os.symlink(f"/proc/self/fd/{self._fd}", link)
            yield link

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(AttributeError, OSError):  # half-built
            self.close()


def read_model(path: Path) -> bytes | SealedFile:
    """The file at ``path``: a :class:`SealedFile` where sealing works, else ``bytes``."""
    if sealing_available():
        return SealedFile.copy_of(path)
    return path.read_bytes()


def sha256_of(data: bytes | SealedFile) -> str:
    if isinstance(data, SealedFile):
        return data.sha256()
    return hashlib.sha256(data).hexdigest()
