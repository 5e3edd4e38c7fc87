"""The non-blocking pipe ends of a tracked process (trio keeps them in ``_unix_pipes.py``).

Invariants:

* Pipes are plain non-blocking fds: closing one never waits for EOF, so neither a
  grandchild holding stdout (cpython#119710, anyio#1174) nor a child blocked on a full
  pipe (anyio#1166) can hang a close.
* ``close()`` is synchronous and idempotent, and safe from a bare loop callback (the
  process plane closes the pipes of a stopped process from its pidfd callbacks).
* A task waiting on a pipe that is closed under it is woken with
  ``ClosedResourceError`` (``anyio.notify_closing``), never left waiting on a dead fd.
"""

from __future__ import annotations

import contextlib
import os
from typing import IO

import anyio
import anyio.abc
import anyio.lowlevel


def _notify_closing(fd: int) -> None:
    """``anyio.notify_closing`` that also works from a bare loop callback.

    Pipes are closed from pidfd callbacks, where no task runs. With sniffio installed
    anyio asks it for the backend, and sniffio looks for a current task: it finds none
    and anyio raises. The runtime is asyncio-only, so tell sniffio that for this call.
    """
    try:
        anyio.notify_closing(fd)
    except anyio.NoEventLoopError:
        import sniffio  # present: it is the detection that just failed

        token = sniffio.current_async_library_cvar.set("asyncio")
        try:
            anyio.notify_closing(fd)
        finally:
            sniffio.current_async_library_cvar.reset(token)


class _PipeEnd:
    """What both ends share: a non-blocking fd, and a close that never waits."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._fd = file.fileno()
        os.set_blocking(self._fd, False)
        self._closed = False

    def close(self) -> None:
        """Close the pipe now (idempotent), waking a task that waits on it."""
        if not self._closed:
            self._closed = True
            _notify_closing(self._fd)
            self._close_file()

    def _close_file(self) -> None:
        self._file.close()

    async def aclose(self) -> None:
        """``close()``, then a checkpoint."""
        self.close()
        await anyio.lowlevel.checkpoint()


class ReceiveStream(_PipeEnd, anyio.abc.ByteReceiveStream):
    """A pipe from the child, read without blocking; closing it never waits for EOF."""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                data = os.read(self._fd, max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(self._fd)
                continue
            except OSError as exc:
                raise anyio.BrokenResourceError from exc
            if not data:
                raise anyio.EndOfStream
            return data

    def read_available(self) -> bytes:
        """Whatever is in the pipe now, without waiting (``b""`` if nothing)."""
        out = bytearray()
        while not self._closed:
            try:
                data = os.read(self._fd, 65536)
            except OSError:
                break
            if not data:
                break
            out += data
        return bytes(out)


class SendStream(_PipeEnd, anyio.abc.ByteSendStream):
    """A pipe to the child, written without blocking; closing it never waits."""

    async def send(self, item: bytes) -> None:
        view = memoryview(item)
        await anyio.lowlevel.checkpoint_if_cancelled()
        while view:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                n = os.write(self._fd, view)
            except BlockingIOError:
                await anyio.wait_writable(self._fd)
                continue
            except OSError as exc:
                raise anyio.BrokenResourceError from exc
            view = view[n:]

    def _close_file(self) -> None:
        with contextlib.suppress(OSError):  # EPIPE flushing nothing: already closed
            self._file.close()
