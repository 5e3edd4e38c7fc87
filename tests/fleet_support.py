"""Worker processes for the fleet tests: spawn ``tests/fleet_worker.py``, send it lines,
wait (bounded) for the JSON events it prints."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("fleet_worker.py")
KEY = "test-fleet-key-0123456789abcdef"

Event = dict[str, Any]


class Worker:
    """One worker process with its own Runtime in the fleet."""

    def __init__(
        self,
        url: str,
        name: str,
        *,
        lease: float = 1.0,
        on_partition: str = "stop",
        audit: Path | None = None,
        key: str = KEY,
        loop: str = "asyncio",
        quiet: bool = False,
    ) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        env["KILL_SWITCH_FLEET_KEY"] = key
        env["FLEET_WORKER_LOOP"] = loop
        env["FLEET_WORKER_QUIET"] = "1" if quiet else "0"
        args = [sys.executable, str(WORKER), url, name, str(lease), on_partition]
        if audit is not None:
            args.append(str(audit))
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.events: list[Event] = []
        self._q: queue.Queue[Event] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.runtime_id = ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self._q.put(json.loads(line))
            except ValueError:
                self._q.put({"event": "garbage", "line": line})

    def expect(self, pred: Callable[[Event], bool], timeout: float = 30.0) -> Event:
        """The first event (seen or coming) that *pred* accepts.

        Raises:
            AssertionError: none within *timeout* (the events seen and stderr are shown).
        """
        for ev in self.events:
            if pred(ev):
                return ev
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                err = ""
                if self.proc.poll() is not None and self.proc.stderr is not None:
                    err = self.proc.stderr.read()
                raise AssertionError(f"no matching event within {timeout} s: {self.events} {err}")
            try:
                ev = self._q.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            self.events.append(ev)
            if pred(ev):
                return ev

    def ready(self, timeout: float = 30.0) -> str:
        """Wait until it joined the fleet; return its runtime id."""
        ev = self.expect(lambda e: e["event"] in ("ready", "error"), timeout)
        assert ev["event"] == "ready", ev
        self.runtime_id = ev["runtime_id"]
        return self.runtime_id

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def start(self, agent: str, sid: str, **labels: str) -> Event:
        """Start session *sid*; return its ``started`` or ``refused`` event."""
        self.send(" ".join(["start", agent, sid, *(f"{k}={v}" for k, v in labels.items())]))
        return self.expect(
            lambda e: e["event"] in ("started", "refused") and e["session_id"] == sid
        )

    def stopped(self, sid: str, timeout: float = 30.0) -> Event:
        return self.expect(lambda e: e["event"] == "stopped" and e["session_id"] == sid, timeout)

    def close(self) -> None:
        """Quit it (bounded), SIGKILL past the bound; always reaped."""
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                with contextlib.suppress(OSError):  # a broken pipe to a dead worker
                    f.close()

    def sigkill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
