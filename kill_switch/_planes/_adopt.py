"""Processes a session's code starts by other means than ``open_process``: seen as they
start, attributed to the session, stopped with it.

Tools and frameworks start processes with ``subprocess.Popen``, ``anyio.run_process``,
``asyncio.create_subprocess_exec``, ``os.posix_spawn``, ``os.system`` or ``os.fork``. Two
interpreter hooks see every one of them in the spawning thread and the spawning code's
context, where the current session is known:

* Python's audit hooks (PEP 578): ``subprocess.Popen``, ``os.posix_spawn``, ``os.system``,
  ``os.fork``/``forkpty`` raise an event *before* the process exists;
* ``os.register_at_fork``: a fork through ``PyOS_BeforeFork`` (``os.fork``, ``Popen`` with
  a ``preexec_fn``, uvloop's ``subprocess_exec``, which raises no audit event) calls back
  before it and, in the parent, right *after* it.

Installed once per process by the first ``Runtime`` (neither hook can be removed; with no
session current they cost a set lookup and a context-variable read). When a session is
current:

* a spawn of an interrupted session is refused: the audit hook raises its
  ``Interrupted``, so nothing starts (a fork seen only by ``register_at_fork`` cannot be
  refused; its child is adopted and stopped at once);
* the spawning thread's children (``/proc/self/task/<tid>/children``) are noted, and a
  ``Spawn`` waits on the session's process plane;
* its child is adopted as ``session.track_pid`` adopts one (its tree is stopped with the
  session, SIGTERM → grace → SIGKILL) and moved into the session's cgroup, where there is
  one, so that everything it forks from then on is held there and cannot reach PID 1.
  After a fork the child is found at once; after an audit event (the process does not
  exist yet) when the loop next runs, polled with back-off for a spawn from a worker
  thread. A stop first resolves every spawn of its session still waiting, and waits
  (bounded by its ``stop_timeout``) for one whose process has not appeared yet: it is
  not quiescent before that process is adopted and stopped.

Why the spawning thread's children: a thread runs one spawn at a time, so the children it
gains after a spawn's event are that spawn's, until its next spawn, which first hands the
previous one what it found. The kernel lists children per thread only with
``CONFIG_PROC_CHILDREN``; without it a spawn cannot be attributed, and the session's stop
says so (``StopReport.unattributed``) and is not quiescent.

Not covered (the README's table): code running outside the session's context (a thread
started with an empty context) is not the session's; a child that forks and exits before
it is adopted (one loop iteration after a ``Popen`` on the loop thread, about a
millisecond from a worker thread) leaves its orphans outside the session; a fork from C
code that neither raises an event nor calls ``PyOS_BeforeFork`` is not seen (the drill's
``untracked`` check still finds such descendants).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final

from kill_switch._vocabulary._audit_event import (
    PROCESS_SIGNAL,
    PROCESS_STARTED,
    PROCESS_UNATTRIBUTED,
)
from kill_switch._vocabulary._exceptions import Interrupted
from kill_switch._vocabulary._stderr import say

from ._context import _current_session
from ._escalation import DEFAULT_POLICY, EscalationPolicy, TrackedGroup
from ._pid_watch import signal_result
from ._process_plane import ProcessPlane
from ._procfs import (
    START_RESOLUTION,
    alive,
    children,
    cmdline,
    descendants,
    start_time,
    thread_children,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from kill_switch._vocabulary._plane import PlaneHost

#: Audit events raised before a process is created.
EVENTS: Final = frozenset(
    {"subprocess.Popen", "os.posix_spawn", "os.system", "os.fork", "os.forkpty", "os.spawn"}
)
#: Back-off of the poll for a child started from a worker thread, and how long to look.
_FIRST_DELAY = 0.0005
_MAX_DELAY = 0.05
_GIVE_UP = 2.0

_own: ContextVar[bool] = ContextVar("kill_switch_own_spawn", default=False)
_lock = threading.Lock()
#: The spawn each thread (native id) made last whose child is not found yet.
_by_thread: dict[int, Spawn] = {}
#: The spawn a fork in progress belongs to (``register_at_fork``), per thread.
_forking = threading.local()
_installed = False


@contextlib.contextmanager
def own_spawn() -> Iterator[None]:
    """Within: spawns are the runtime's own (``open_process`` tracks them itself)."""
    token = _own.set(True)
    try:
        yield
    finally:
        _own.reset(token)


def install() -> None:
    """Install the hooks, once per process (idempotent, thread-safe)."""
    global _installed
    with _lock:
        if _installed:
            return
        sys.addaudithook(_audit_hook)
        os.register_at_fork(before=_before_fork, after_in_parent=_after_fork)
        _installed = True


def adopt(
    plane: ProcessPlane,
    pid: int,
    policy: EscalationPolicy,
    *,
    via: str = "",
    argv: tuple[str, ...] = (),
) -> bool:
    """Track *pid*, started by other means, on *plane*; ``False`` if it has gone.

    Not reaped here, even when it is our child: its ``Popen`` or asyncio watcher does
    that. *via* names the event it was seen through, for a spawn seen by the hooks (which
    is then moved into the session's cgroup, where there is one); *argv*, the command the
    event named (read from ``/proc`` otherwise: right after a fork it is still ours).
    """
    if plane.is_tracked(pid):
        return True
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return False
    is_leader = pgid == pid and pgid != os.getpgrp()
    tracked = TrackedGroup(
        plane,
        pid,
        pgid=pgid if is_leader else None,
        command=argv or cmdline(pid),
        own=False,
        policy=policy,
        adopted=True,
    )
    details: dict[str, Any] = {
        "pid": pid,
        "pgid": pgid,
        "command": list(tracked.command),
        "adopted": True,
    }
    if via:
        details["via"] = via
        details["containment"] = plane.hold(pid)
    plane.record(PROCESS_STARTED, details)
    plane.track(tracked)
    return True


# ------------------------------------------------------------------ the hooks


def _audit_hook(event: str, args: tuple[Any, ...]) -> None:
    if event not in EVENTS:
        return
    host = _current_session.get()
    if host is None or _own.get():
        return
    if host.is_interrupted():
        # Refused: an audit hook's exception aborts the operation, nothing starts.
        raise host.interrupted_error()
    try:
        argv = _argv(event, args)
        _note(host, _describe(event, argv), argv)
    except Interrupted:
        raise
    except Exception as exc:  # a hook must not break the caller's spawn: say it instead
        say(f"kill_switch: a {event} in session {host.id} could not be attributed: {exc!r}")


def _before_fork() -> None:
    host = _current_session.get()
    if host is None or _own.get():
        return
    try:
        _forking.spawn = _note(host, "fork", ())
    except Exception as exc:  # as above; an at-fork callback's error would be lost
        say(f"kill_switch: a fork in session {host.id} could not be attributed: {exc!r}")


def _after_fork() -> None:
    spawn: Spawn | None = getattr(_forking, "spawn", None)
    if spawn is None:
        return
    _forking.spawn = None
    try:
        spawn.forked()
    except Exception as exc:  # as above
        say(f"kill_switch: a fork in session {spawn.host.id} could not be attributed: {exc!r}")


def _argv(event: str, args: tuple[Any, ...]) -> tuple[str, ...]:
    """The command the event names (``()`` for a fork)."""
    what: object = args[1] if event in ("subprocess.Popen", "os.posix_spawn") else args
    if event == "os.system" and args:
        return ("sh", "-c", _text(args[0]))
    if isinstance(what, (str, bytes)):
        return (_text(what),)
    if isinstance(what, (list, tuple)) and event != "os.fork":
        return tuple(_text(a) for a in what)
    return ()


def _text(value: object) -> str:
    return os.fsdecode(value) if isinstance(value, (str, bytes)) else str(value)


def _describe(event: str, argv: tuple[str, ...]) -> str:
    """A short, printable description of the spawn (for the audit and the report)."""
    text = f"{event}: {' '.join(argv)}" if argv else event
    return text if len(text) <= 200 else text[:199] + "…"


def _note(host: PlaneHost, what: str, argv: tuple[str, ...]) -> Spawn | None:
    """The spawning thread is about to start a process for *host*: note its children."""
    if host.state in ("finished", "failed") or host.runtime_closed:
        return None  # the session is over; its end stopped what it had
    tid = threading.get_native_id()
    before = thread_children(tid)
    with _lock:
        previous = _by_thread.get(tid)
        if previous is not None and previous.host is host:
            # One spawn seen twice (an event, then its fork), or two before the loop
            # looked: the earlier note takes every child since.
            return previous
        spawn = Spawn(host, tid, what, argv, before)
        _by_thread[tid] = spawn
    if previous is not None:
        previous.hand_over()
    if host.on_loop_thread():
        spawn.attach()
    else:
        host.call_soon_threadsafe(spawn.attach)
    return spawn


# ------------------------------------------------------------------ one spawn


class Spawn:
    """A process one thread is starting for a session, until its child is adopted."""

    __slots__ = (
        "argv",
        "before",
        "deadline",
        "delay",
        "done",
        "gone",
        "host",
        "noted_at",
        "plane",
        "polling",
        "tid",
        "what",
    )

    def __init__(
        self,
        host: PlaneHost,
        tid: int,
        what: str,
        argv: tuple[str, ...],
        before: list[int] | None,
    ) -> None:
        self.host = host
        self.tid = tid
        self.what = what
        self.argv = argv
        #: The thread's children before the spawn (``None``: the kernel does not list
        #: them, and the spawn cannot be attributed).
        self.before = None if before is None else set(before)
        self.plane: ProcessPlane | None = None
        self.done = False
        #: the spawning thread exited before its child was found: the child was handed
        #: to another thread of this process, where it cannot be told from others
        self.gone = False
        self.polling = False
        self.noted_at = time.time()  # the scale of a process's start time in /proc
        self.deadline = time.monotonic() + _GIVE_UP
        self.delay = _FIRST_DELAY

    def new_children(self) -> list[int]:
        """Children the thread gained since the spawn's event (any thread)."""
        if self.before is None:
            return []
        now = thread_children(self.tid)
        if now is None:
            self.gone = True
            return []
        if not now:
            return []
        new = [p for p in now if p not in self.before]
        self.before.update(new)
        return new

    # -- on the loop

    def attach(self) -> None:
        """Wait on the session's process plane, then look for the child. Loop thread."""
        host = self.host
        try:
            self.plane = host.plane(ProcessPlane, lambda: ProcessPlane(host, DEFAULT_POLICY))
        except RuntimeError:
            # Interrupted (or ended) since the event, with no process plane to stop the
            # child: it is killed here once found.
            self.plane = None
        if self.before is None:
            self._unattributed("this kernel does not list a thread's children")
            return
        if self.plane is not None:
            self.plane.expect(self)
        self._schedule(0.0)

    def _schedule(self, delay: float) -> None:
        if self.polling or self.done:
            return
        self.polling = True
        if delay:
            self.host.call_later(delay, self.poll)
        else:
            self.host.call_soon(self.poll)

    def poll(self) -> None:
        """Look for the child; adopt it, or look again later. Loop thread."""
        self.polling = False
        if self.done:
            return
        if self.settle_now():
            return
        if time.monotonic() >= self.deadline:
            if self.gone:
                self._unattributed("the thread that started it exited before it was found")
            else:
                # No child appeared: the spawn failed, or its process ended at once.
                self._finish()
            return
        self._schedule(self.delay)
        self.delay = min(self.delay * 2, _MAX_DELAY)

    def settle_now(self) -> bool:
        """Adopt the children found now; whether any was (the spawn is then done). Loop
        thread (the process plane calls it before it stops anything)."""
        if self.done:
            return True
        new = self.new_children()
        if not new:
            if self.gone and not self._may_run_elsewhere():
                self._finish()  # whatever it started has exited: nothing to stop
                return True
            # Not found yet; or its thread exited and a child that may be its still runs
            # (one just killed takes a moment to die): looked at again until the search
            # gives up, which then reports it.
            return False
        self.adopt(new)
        self._finish()
        return True

    def _may_run_elsewhere(self) -> bool:
        """After the spawning thread exited (its children went to another thread):
        whether a running child of this process, started since the spawn and not
        tracked by the session, may be the spawn's."""
        since = self.noted_at - 2 * START_RESOLUTION
        plane = self.plane
        for pid in children(os.getpid()):
            if (plane is not None and plane.is_tracked(pid)) or not alive(pid):
                continue
            started = start_time(pid)
            if started is not None and started >= since:
                return True
        return False

    def _unattributed(self, why: str) -> None:
        """The spawn's process cannot be found: audit and report it, stop looking."""
        reason = f"{self.what}: its process cannot be found ({why})"
        self.host.record(PROCESS_UNATTRIBUTED, details={"spawn": self.what, "why": reason})
        if self.plane is not None:
            self.plane.unattributed.append(reason)
        self._finish()

    def adopt(self, pids: list[int]) -> None:
        """Adopt *pids* on the session's process plane. Loop thread."""
        plane = self.plane
        for pid in pids:
            if plane is not None:
                # The command the event named is the first child's; a later one (two
                # spawns before the loop looked) is read from /proc.
                argv = self.argv if len(pids) == 1 else ()
                adopt(plane, pid, plane.policy, via=self.what, argv=argv)
            else:
                self._kill(pid)

    def _kill(self, pid: int) -> None:
        """No plane to stop it: SIGKILL *pid*'s tree now, and say so."""
        tree = [pid, *descendants(pid)]
        for p in tree:
            try:
                os.kill(p, signal.SIGKILL)
                result = "sent"
            except OSError as exc:
                result = signal_result(exc)
            self.host.record(
                PROCESS_SIGNAL,
                details={"pid": p, "signal": "SIGKILL", "target": "pid", "result": result},
            )
        self.host.note_secondary(
            f"{self.what} started as the session was interrupted: killed (pids {tree})"
        )

    def _finish(self) -> None:
        self.done = True
        with _lock:
            if _by_thread.get(self.tid) is self:
                del _by_thread[self.tid]
        if self.plane is not None:
            self.plane.forget(self)

    # -- in the spawning thread

    def forked(self) -> None:
        """Right after a fork of this spawn, in the parent: the child exists now."""
        if self.host.on_loop_thread():
            self.settle_now()  # ``attach`` ran in the event's callback: the plane is known
        else:
            self.hand_over()

    def hand_over(self) -> None:
        """From the spawning thread: pass the children found so far to the loop."""
        new = self.new_children()
        if new:
            with contextlib.suppress(RuntimeError):  # the loop closed: nothing runs
                self.host.call_soon_threadsafe(self._adopt_found, new)

    def _adopt_found(self, pids: list[int]) -> None:
        # ``attach`` was scheduled before this, so the plane (if any) is known.
        self.adopt(pids)
        self._finish()
