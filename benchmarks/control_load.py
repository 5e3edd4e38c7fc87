"""A hostile local client of the control plane, in a process of its own: the soak load.

    python benchmarks/control_load.py URL [--idle 100] [--half 100] [--flooders 4] [--rate R]

It holds *idle* connections that send nothing and *half* connections that send part of
a request head and stop (re-opened whenever the server closes one), and *flooders*
connections that send requests with a bad bearer token, *rate* per second in all, or
as fast as the answers come (``--rate 0``).

Driven by lines on stdin, each acknowledged by one line on stdout:

* ``on``  — open the sockets and start the flood; ``ok on <open sockets>`` once all are open.
* ``off`` — stop the flood and close every socket; ``ok off``.
* ``stats`` — ``{"requests", "statuses", "reopened", "open"}`` as one JSON line.
* end of input — ``off``, then exit.

Used by ``tests/test_control_hardening.py`` (the soak test) and
``benchmarks/bench_control_soak.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from collections.abc import Coroutine

HALF_HEAD = b"GET /api/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
BAD = b"GET /api/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer kst_bad\r\n\r\n"


class Load:
    """The sockets and the flood, on this process's event loop."""

    def __init__(
        self, host: str, port: int, idle: int, half: int, flooders: int, rate: float = 0.0
    ) -> None:
        self.host, self.port = host, port
        self.idle, self.half, self.flooders = idle, half, flooders
        # Seconds between two requests of one flooder (0: as fast as the answers come).
        self.gap = flooders / rate if rate > 0 else 0.0
        self.tasks: set[asyncio.Task[None]] = set()
        self.statuses: Counter[str] = Counter()
        self.requests = 0
        self.reopened = 0
        self.open = 0

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new connection to the server, retried until it accepts one."""
        while True:
            try:
                return await asyncio.open_connection(self.host, self.port)
            except OSError:
                await asyncio.sleep(0.05)

    async def _hold(self, head: bytes, opened: asyncio.Event) -> None:
        """One socket held open (re-opened when the server closes it)."""
        first = True
        while True:
            reader, writer = await self._connect()
            self.open += 1
            if not first:
                self.reopened += 1
            first = False
            opened.set()
            try:
                if head:
                    writer.write(head)
                await reader.read()  # until the server closes it
            except OSError:
                pass
            finally:
                self.open -= 1
                writer.close()

    async def _flood(self) -> None:
        """Bad tokens, one after the other on a kept-alive connection."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            reader, writer = await self._connect()
            try:
                while True:
                    if self.gap:
                        due = max(due + self.gap, loop.time() - 1.0)
                        await asyncio.sleep(max(0.0, due - loop.time()))
                    writer.write(BAD)
                    line = await reader.readline()
                    if not line:
                        break
                    self.statuses[line.split(b" ", 2)[1].decode()] += 1
                    self.requests += 1
                    length = 0
                    while (header := await reader.readline()) not in (b"\r\n", b""):
                        if header.lower().startswith(b"content-length:"):
                            length = int(header.split(b":", 1)[1])
                    await reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

    async def on(self) -> None:
        """Open every socket (wait until each has connected) and start the flood."""
        events = []
        for i in range(self.idle + self.half):
            opened = asyncio.Event()
            events.append(opened)
            head = HALF_HEAD if i >= self.idle else b""
            self._start(self._hold(head, opened))
        for opened in events:
            await opened.wait()
        for _ in range(self.flooders):
            self._start(self._flood())

    def _start(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def off(self) -> None:
        """Stop everything and close every socket."""
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class LineProcess:
    """A child process driven by lines on its stdin, each acknowledged by one line on its
    stdout (blocking calls); ``close`` ends its input, then waits for it, bounded."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name = Path(argv[1]).name if len(argv) > 1 else argv[0]  # the script
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
        )

    def command(self, line: str) -> str:
        """Send *line*; its acknowledgement.

        Raises:
            RuntimeError: the process answered an error or ended.
        """
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if not answer or answer.startswith("error"):
            raise RuntimeError(f"{self.name}: {answer or 'ended'} (after {line!r})")
        return answer

    def close(self) -> None:
        """End the process (bounded)."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LoadProcess(LineProcess):
    """``control_load.py`` in a child process, driven from this one (blocking calls)."""

    def __init__(
        self,
        url: str,
        *,
        idle: int = 100,
        half: int = 100,
        flooders: int = 4,
        rate: float = 0.0,
    ) -> None:
        script = Path(__file__).resolve()
        super().__init__(
            [
                *(sys.executable, str(script), url),
                *("--idle", str(idle), "--half", str(half), "--flooders", str(flooders)),
                *("--rate", str(rate)),
            ]
        )
        self.running = False

    def on(self) -> int:
        """Start the load; the number of sockets it holds open."""
        answer = self.command("on")
        self.running = True
        return int(answer.split()[-1])

    def off(self) -> None:
        """Stop the load and close its sockets."""
        self.command("off")
        self.running = False

    def stats(self) -> dict[str, Any]:
        """Requests sent, statuses seen, sockets re-opened and open now."""
        data: dict[str, Any] = json.loads(self.command("stats"))
        return data


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--idle", type=int, default=100)
    parser.add_argument("--half", type=int, default=100)
    parser.add_argument("--flooders", type=int, default=4)
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s in all (0: max)")
    args = parser.parse_args(argv)
    host, port = args.url.removeprefix("http://").rstrip("/").split(":")
    load = Load(host, int(port), args.idle, args.half, args.flooders, args.rate)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    while command := (await reader.readline()).decode().strip():
        if command == "on":
            await load.on()
            say(f"ok on {load.open}")
        elif command == "off":
            await load.off()
            say("ok off")
        elif command == "stats":
            stats = {
                "requests": load.requests,
                "statuses": dict(load.statuses),
                "reopened": load.reopened,
                "open": load.open,
            }
            say(json.dumps(stats))
        else:
            say(f"error: unknown command {command!r}")
    await load.off()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
