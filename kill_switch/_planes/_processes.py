"""The process plane: tracked subprocess trees and their SIGTERM → grace → SIGKILL ladder.

Every process a session starts gets its own process group (``start_new_session=True``),
the session's marker in its environment (``KILL_SWITCH_SESSION``), and, where cgroup v2
is writable, a place in the session's own cgroup before it can fork. On interrupt each
tracked group goes down the ladder of its ``EscalationPolicy``::

    find members          cgroup.procs, or a /proc scan (pgid, parent chain, marker)
    SIGTERM → group       killpg; escapees (setsid / double fork) by pidfd, one by one
    grace                 the group is done early once every member it had has exited
    SIGKILL → group       plus an audit event and an ``EscalationWarning``
    verify                cgroup.kill + ``populated 0``, or a last /proc scan
    reap                  the leader, with waitpid(pid) - never waitpid(-1)

Invariants:

* A leader that is stopped is reaped only after the last signal to its group: its
  zombie pins the pgid, so ``killpg`` can never reach a reused group. A group that
  answered ESRCH is known empty and never signalled again; our own group never is.
* Single pids are signalled through a pidfd where the kernel has one (no PID reuse).
* Everything runs on the event loop thread, in callbacks (pidfd readers, timers): a
  stop creates no task, and ``deliver`` never blocks.
* Pipes are plain non-blocking fds: closing one never waits for EOF, so neither a
  grandchild holding stdout (cpython#119710, anyio#1174) nor a child blocked on a full
  pipe (anyio#1166) can hang a close.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from io import BytesIO
from typing import IO, TYPE_CHECKING, Any, Final, Literal, TypeAlias, TypedDict, Unpack

import anyio
import anyio.abc
import anyio.lowlevel
import attrs

from kill_switch._vocabulary._audit_event import (
    PROCESS_CONTAINMENT,
    PROCESS_ESCAPED,
    PROCESS_EXITED,
    PROCESS_SIGNAL,
    PROCESS_STARTED,
)
from kill_switch._vocabulary._plane import Plane, StopFields
from kill_switch._vocabulary._report import ProcessReport
from kill_switch._vocabulary._snapshots import ProcessInfo
from kill_switch._vocabulary._validate import attrs_check, positive_int, seconds

from ._cgroup import CgroupUnavailable, SessionCgroup
from ._procfs import alive as _alive
from ._procfs import cmdline as _cmdline
from ._procfs import descendants as _descendants
from ._procfs import has_in_environ
from ._procfs import scan as _scan
from ._procfs import stat as _stat

if TYPE_CHECKING:
    import asyncio

    from kill_switch._vocabulary._plane import ForcePath, PlaneHost
    from kill_switch._vocabulary._report import InterruptRequest

PIPE: Final = subprocess.PIPE
STDOUT: Final = subprocess.STDOUT
DEVNULL: Final = subprocess.DEVNULL

#: Environment variable carrying the session id into every process the session starts;
#: descendants inherit it, which finds escapees when no cgroup is available.
TRACKING_ENV: Final = "KILL_SWITCH_SESSION"

Containment = Literal["cgroup", "process_group"]

#: Argument types of ``open_process`` / ``run_process`` (as ``anyio.open_process``).
Command: TypeAlias = str | bytes | Sequence[str | bytes | os.PathLike[str]]
StdIO: TypeAlias = int | IO[Any] | None
PathArg: TypeAlias = str | bytes | os.PathLike[str] | None
GroupList: TypeAlias = Iterable[str | int] | None
Fds: TypeAlias = Sequence[int]
CompletedProcess = subprocess.CompletedProcess


class ProcessArgs(TypedDict, total=False):
    """The keyword arguments ``open_process`` and ``run_process`` share (as in
    ``anyio.open_process``, plus ``escalation``); passed on with ``Unpack`` so that they
    are written once (trio's ``GeneralProcessArgs``)."""

    stdin: StdIO
    stdout: StdIO
    stderr: StdIO
    cwd: PathArg
    env: Mapping[str, str] | None
    pass_fds: Fds
    user: str | int | None
    group: str | int | None
    extra_groups: GroupList
    umask: int
    escalation: EscalationPolicy | None


_VERIFY_ROUNDS = 3
_POLL_MIN = 0.001
_POLL_MAX = 0.05


class EscalationWarning(RuntimeWarning):
    """A tracked process group ignored SIGTERM for its whole grace and was SIGKILLed."""


_grace_validator = attrs.validators.optional(attrs_check(seconds, zero_ok=True))
_positive_validator = attrs_check(seconds)


def _bool_validator(_inst: Any, attr: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{attr.name} must be a bool, not {type(value).__name__}")


@attrs.frozen
class EscalationPolicy:
    """How a session's interrupt stops one tracked process group.

    Attributes:
        grace: seconds between SIGTERM and SIGKILL to the group; ``None`` takes the
            session's ``StopPolicy.term_grace``. ``0`` sends SIGKILL right after SIGTERM.
        kill_timeout: seconds to wait after SIGKILL before a process that is still
            there is reported ``survived``.
        cgroup: put the session's processes in a cgroup of their own where cgroup v2 is
            writable, and kill them with ``cgroup.kill`` (falls back to process groups,
            and says so in the report). Decided by the session's first process.
        find_escapees: without a cgroup, scan ``/proc`` (about 1 ms per 100 processes)
            for descendants that left the group; without it only the group and the live
            parent chain are covered.
    """

    grace: float | None = attrs.field(default=None, validator=_grace_validator)
    kill_timeout: float = attrs.field(default=5.0, validator=_positive_validator)
    cgroup: bool = attrs.field(default=True, validator=_bool_validator)
    find_escapees: bool = attrs.field(default=True, validator=_bool_validator)


def _result(exc: OSError) -> str:
    if exc.errno == errno.ESRCH:
        return "esrch"
    if exc.errno == errno.EPERM:
        return "eperm"
    return f"error: {exc.strerror or exc!r}"


def _status_to_returncode(code: int, status: int) -> int:
    return -status if code in (os.CLD_KILLED, os.CLD_DUMPED) else status


# -------------------------------------------------------------------- one watched pid


class _Watch:
    """One pid watched for its exit: a pidfd reader where the kernel has pidfds, else a
    poll with back-off. Loop thread only."""

    __slots__ = ("_cb", "_delay", "_loop", "_timer", "child", "exited_at", "fd", "pid")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pid: int,
        cb: Callable[[_Watch], None],
        *,
        child: bool,
    ) -> None:
        self._loop = loop
        self.pid = pid
        self._cb = cb
        self.child = child
        self.exited_at: float | None = None
        self.fd = -1
        self._timer: asyncio.TimerHandle | None = None
        self._delay = _POLL_MIN
        try:
            self.fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.exited_at = time.monotonic()
            loop.call_soon(self._fire)
            return
        except (AttributeError, OSError):  # no pidfd here (old kernel, seccomp): poll
            self._timer = loop.call_later(self._delay, self._poll)
            return
        loop.add_reader(self.fd, self._ready)

    def _ready(self) -> None:
        self._loop.remove_reader(self.fd)
        self.exited_at = time.monotonic()
        self._fire()

    def _poll(self) -> None:
        self._timer = None
        if self._gone():
            self.exited_at = time.monotonic()
            self._fire()
            return
        self._delay = min(_POLL_MAX, self._delay * 2)
        self._timer = self._loop.call_later(self._delay, self._poll)

    def _gone(self) -> bool:
        if self.child:
            try:
                res = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return True
            return res is not None
        return not _alive(self.pid)

    def _fire(self) -> None:
        cb = self._cb
        self._cb = _noop
        cb(self)

    def send(self, sig: int) -> str:
        """Signal this pid; ``"exited"`` without signalling if it is known gone."""
        if self.exited_at is not None:
            return "exited"
        try:
            if self.fd >= 0:
                signal.pidfd_send_signal(self.fd, sig)
            else:
                os.kill(self.pid, sig)
        except OSError as exc:
            return _result(exc)
        return "sent"

    def peek_returncode(self) -> int | None:
        """The exit status of a child of ours without reaping it (``None``: unknown)."""
        try:
            if self.fd >= 0:
                res = os.waitid(os.P_PIDFD, self.fd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            else:
                res = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except OSError:
            return None
        if res is None:
            return None
        return _status_to_returncode(res.si_code, res.si_status)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.fd >= 0:
            if self.exited_at is None:
                self._loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
        self._cb = _noop


def _noop(_watch: _Watch) -> None:
    return None


# ------------------------------------------------------------------- a tracked group

Stage = Literal["running", "term", "kill", "settled", "closed"]


class _Group:
    """One tracked process (a leader we started or adopted, or an escapee) and the
    members of its process group. Loop thread only."""

    __slots__ = (
        "_timer",
        "adopted",
        "command",
        "error",
        "escaped",
        "exited",
        "first_signal",
        "group_empty",
        "leader",
        "members",
        "own",
        "pgid",
        "plane",
        "policy",
        "popen",
        "process",
        "reaped",
        "returncode",
        "signals",
        "stage",
        "survived",
    )

    def __init__(
        self,
        plane: ProcessPlane,
        pid: int,
        *,
        pgid: int | None,
        command: tuple[str, ...],
        own: bool,
        policy: EscalationPolicy,
        popen: subprocess.Popen[bytes] | None = None,
        adopted: bool = False,
        escaped: bool = False,
    ) -> None:
        self.plane = plane
        self.pgid = pgid
        self.command = command
        self.own = own
        self.policy = policy
        self.popen = popen
        self.adopted = adopted
        self.escaped = escaped
        self.members: dict[int, _Watch] = {}
        self.signals: list[str] = []
        self.stage: Stage = "running"
        self.first_signal: float | None = None
        self.returncode: int | None = None
        self.reaped = False
        self.error: str | None = None
        self.survived = False
        #: never killpg this group again: it answered ESRCH (known empty), or it is an
        #: escapee's, which no zombie of ours pins.
        self.group_empty = False
        self.process: TrackedProcess | None = None
        self.exited: anyio.Event | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.leader = _Watch(plane.loop, pid, self._leader_exited, child=own)

    @property
    def pid(self) -> int:
        return self.leader.pid

    # -- exits

    def _leader_exited(self, _watch: _Watch) -> None:
        if self.stage == "running":
            # Exited by itself: reap it now and stop tracking it.
            self.reap()
            self.plane._record(
                PROCESS_EXITED,
                {"pid": self.pid, "pgid": self.pgid, "returncode": self.returncode},
            )
            self.close()
            self.plane._untrack(self)
        else:
            self._check_settled()

    def _member_exited(self, _watch: _Watch) -> None:
        self._check_settled()

    def add_member(self, pid: int) -> None:
        if pid not in self.members and pid != self.pid:
            self.members[pid] = _Watch(self.plane.loop, pid, self._member_exited, child=False)

    def alive(self) -> list[_Watch]:
        watches = [self.leader, *self.members.values()]
        return [w for w in watches if w.exited_at is None]

    # -- the ladder

    def start_stop(self, now: float, *, kill_now: bool = False) -> None:
        self.first_signal = now
        if kill_now:
            self.escalate(warn=False)
            return
        self.stage = "term"
        self.signal(signal.SIGTERM)
        grace = self.policy.grace
        if grace is None:
            grace = self.plane.session.policy.term_grace
        if self.stage == "term":
            self._timer = self.plane.loop.call_later(grace, self.escalate)
            self._check_settled()

    def signal(self, sig: signal.Signals) -> None:
        """Send *sig* to the group (or to each live pid if the group cannot take it)."""
        name = sig.name
        self.signals.append(name)
        pgid = self.pgid
        if (
            pgid is not None
            and pgid > 1
            and not self.group_empty
            and pgid != os.getpgrp()
            and not self.reaped
        ):
            try:
                os.killpg(pgid, sig)
            except OSError as exc:
                result = _result(exc)
            else:
                result = "sent"
            self.plane._record(
                PROCESS_SIGNAL,
                {
                    "pid": self.pid,
                    "pgid": pgid,
                    "signal": name,
                    "target": "group",
                    "result": result,
                },
            )
            if result == "sent":
                return
            if result == "esrch":
                # The group is empty (or says so): never signal this pgid again.
                self.group_empty = True
            else:
                self.error = f"killpg({pgid}, {name}): {result}"
        for watch in self.alive():
            result = watch.send(sig)
            self.plane._record(
                PROCESS_SIGNAL,
                {"pid": watch.pid, "pgid": pgid, "signal": name, "target": "pid", "result": result},
            )
            if result not in ("sent", "exited", "esrch"):
                self.error = f"signal {name} to {watch.pid}: {result}"

    def escalate(self, *, warn: bool = True) -> None:
        self._timer = None
        if self.stage in ("settled", "closed", "kill"):
            return
        self.stage = "kill"
        self.signal(signal.SIGKILL)
        if warn:
            grace = self.policy.grace
            if grace is None:
                grace = self.plane.session.policy.term_grace
            self.plane._warn(
                f"process {self.pid} (group {self.pgid}) of session {self.plane.session.id} "
                f"was still running {grace:g} s after SIGTERM; sent SIGKILL"
            )
        self.plane._maybe_cgroup_kill()
        if self.stage == "kill":
            self._timer = self.plane.loop.call_later(self.policy.kill_timeout, self._give_up)
            self._check_settled()

    def _give_up(self) -> None:
        self._timer = None
        if self.stage != "kill":
            return
        self.survived = True
        alive = [w.pid for w in self.alive()]
        self.error = self.error or f"still running after SIGKILL: {alive}"
        self._settle()

    def _check_settled(self) -> None:
        if self.stage in ("term", "kill") and not self.alive():
            self._settle()

    def _settle(self) -> None:
        self.stage = "settled"
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.plane._group_settled(self)

    # -- reaping and closing

    def reap(self) -> None:
        """Collect the leader's exit status (waitpid(pid) only for a child we started)."""
        if self.reaped:
            return
        if self.own:
            if self.leader.exited_at is None and self.returncode is None:
                return
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.reaped = True
                self.error = self.error or "reaped by someone else"
                return
            if pid == 0:
                return
            self.reaped = True
            self.returncode = os.waitstatus_to_exitcode(status)
            if self.popen is not None:
                # Popen must never waitpid() this pid again: it may be reused by now.
                self.popen.returncode = self.returncode
        elif self.leader.exited_at is not None:
            # Not ours to reap (its parent does); read its status if it is our child.
            self.returncode = self.leader.peek_returncode()
            self.reaped = True
        if self.exited is not None:
            self.exited.set()

    def close(self) -> None:
        if self.stage == "closed":
            return
        self.stage = "closed"
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.leader.close()
        for w in self.members.values():
            w.close()

    def report(self) -> ProcessReport:
        exit_times = [w.exited_at for w in (self.leader, *self.members.values())]
        seconds: float | None = None
        if self.first_signal is not None and all(t is not None for t in exit_times):
            seconds = max(t for t in exit_times if t is not None) - self.first_signal
            seconds = max(0.0, seconds)
        return ProcessReport(
            pid=self.pid,
            pgid=self.pgid,
            command=self.command,
            signals=tuple(self.signals),
            returncode=self.returncode,
            seconds_to_exit=seconds,
            escaped=self.escaped,
            survived=self.survived,
            error=self.error,
            members=tuple(sorted(self.members)),
            containment=self.plane.containment,
            adopted=self.adopted,
        )


# -------------------------------------------------------------------------- the plane


class ProcessPlane(Plane):
    """The processes of one session and how its interrupt stops them (a ``Plane``).

    Created by the session's first ``open_process`` / ``track_pid``. Loop thread only.
    """

    def __init__(self, session: PlaneHost, policy: EscalationPolicy) -> None:
        self.session = session
        self.loop = session.loop
        self.policy = policy
        self._groups: dict[int, _Group] = {}
        self._stopping: list[_Group] = []
        self._delivered = False
        self._finished = False
        self._done = anyio.Event()
        self._rounds = 0
        self._recheck: asyncio.TimerHandle | None = None
        self._recheck_until = 0.0
        self._cgroup_killed = False
        self._marker = f"\0{TRACKING_ENV}={session.id}\0".encode()
        self._cgroup: SessionCgroup | None = None
        self.containment: Containment = "process_group"
        self._cgroup_reason = "disabled by EscalationPolicy(cgroup=False)"
        self._want_cgroup = policy.cgroup

    # -- containment

    def _ensure_cgroup(self) -> SessionCgroup | None:
        if self._cgroup is not None or not self._want_cgroup:
            return self._cgroup
        try:
            self._cgroup = SessionCgroup.create(f"{os.getpid()}-{os.urandom(6).hex()}")
        except CgroupUnavailable as exc:
            self._want_cgroup = False
            self._cgroup_reason = str(exc)
            self._record(PROCESS_CONTAINMENT, {"containment": "process_group", "reason": str(exc)})
            return None
        if self.containment != "cgroup":
            self.containment = "cgroup"
            self._record(PROCESS_CONTAINMENT, {"containment": "cgroup", "path": self._cgroup.path})
        return self._cgroup

    def _cgroup_failed(self, reason: str) -> None:
        """A child could not enter the cgroup: fall back to process groups for good."""
        self._want_cgroup = False
        self._cgroup_reason = reason
        self.containment = "process_group"
        self._record(PROCESS_CONTAINMENT, {"containment": "process_group", "reason": reason})
        self._drop_cgroup()

    def _drop_cgroup(self, delay: float = 0.0) -> None:
        """Remove the idle session cgroup; while processes are still leaving it, retry
        with back-off for about a second (escapees that keep running keep it)."""
        cg = self._cgroup
        if cg is None or self._groups:
            return
        if cg.remove():
            self._cgroup = None
        elif delay < 0.5:
            delay = max(_POLL_MIN, delay * 2)
            self.loop.call_later(delay, self._drop_cgroup, delay)

    # -- tracking

    def info(self) -> tuple[ProcessInfo, ...]:
        """Snapshots of the processes this plane tracks (loop thread)."""
        return tuple(
            ProcessInfo(
                g.pid,
                g.pgid,
                tuple(g.command),
                bool(g.reaped),
                bool(g.adopted),
                bool(g.escaped),
                tuple(g.signals),
            )
            for g in list(self._groups.values())
        )

    def track(self, group: _Group) -> None:
        self._groups[group.pid] = group
        if self._delivered:
            # A process tracked after the interrupt was delivered is stopped at once.
            self._stopping.append(group)
            self._finished = False
            group.start_stop(time.monotonic(), kill_now=True)

    def _untrack(self, group: _Group) -> None:
        if self._groups.get(group.pid) is group:
            del self._groups[group.pid]
        if not self._groups and not self._delivered:
            self._drop_cgroup()

    # -- Plane protocol

    def deliver(self, request: InterruptRequest) -> None:
        """Start the ladder for every tracked group. Loop thread; never blocks."""
        if self._delivered:
            return
        self._delivered = True
        now = time.monotonic()
        groups = [g for g in self._groups.values() if g.stage == "running"]
        escapees = self._discover(groups)
        self._stopping.extend(groups)
        self._stopping.extend(escapees)
        for g in escapees:
            self._record(
                PROCESS_ESCAPED,
                {"pid": g.pid, "pgid": g.pgid, "command": list(g.command), "found": "deliver"},
            )
        for g in (*groups, *escapees):
            g.start_stop(now)
        self._maybe_finish()

    async def settle(self, deadline: float) -> None:
        """Wait until every stopped group is reaped and verified, or until *deadline*."""
        if not self._delivered or self._done.is_set():
            return
        with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
            await self._done.wait()

    def quiescent(self) -> bool:
        """Every process of the stop is gone (none survived, the stop is verified)."""
        return self._done.is_set() and not any(g.survived for g in self._stopping)

    def stop_fields(self) -> StopFields:
        """One ``ProcessReport`` per process of the stop."""
        return StopFields(processes=tuple(g.report() for g in self._stopping))

    def busy(self) -> bool:
        """Whether a tracked process is still running (the block's end stops it)."""
        return any(g.stage == "running" for g in self._groups.values())

    # -- out of band

    def force(self, path: ForcePath) -> None:
        """SIGKILL every tracked group now, from any thread (the loop may be stuck).

        For the out-of-band path and the watchdog: no grace (a wedged loop cannot run
        the ladder's timers), no reaping (the loop reaps when it wakes; until then each
        leader's zombie pins its group id, so no group id can have been reused). The
        session cgroup, where there is one, is killed as a whole.
        """
        cg = self._cgroup
        if cg is not None:
            try:
                cg.kill()
                result = "sent"
            except OSError as exc:
                result = _result(exc)
            self._record(
                PROCESS_SIGNAL,
                {
                    "target": "cgroup",
                    "path": cg.path,
                    "signal": "SIGKILL",
                    "result": result,
                    "via": path,
                },
            )
        own = os.getpgrp()
        for group in list(self._groups.values()):
            pgid = group.pgid
            if pgid is None or pgid <= 1 or pgid == own or group.group_empty or group.reaped:
                continue
            try:
                os.killpg(pgid, signal.SIGKILL)
                result = "sent"
            except OSError as exc:
                result = _result(exc)
            group.signals.append("SIGKILL")
            self._record(
                PROCESS_SIGNAL,
                {
                    "pid": group.pid,
                    "pgid": pgid,
                    "signal": "SIGKILL",
                    "target": "group",
                    "result": result,
                    "via": path,
                },
            )

    # -- discovery

    def _discover(self, groups: list[_Group]) -> list[_Group]:
        """Fill in each group's members; return the escapees found as new groups."""
        by_pgid = {g.pgid: g for g in groups if g.pgid is not None}
        known = {g.pid for g in groups}
        me = os.getpid()
        candidates: dict[int, int | None] = {}  # pid -> pgid (None: look it up)
        cg = self._cgroup
        if cg is not None:
            for pid in cg.procs():
                candidates[pid] = None
        adopted = [g for g in groups if g.adopted or cg is None]
        if adopted:
            if cg is None and any(g.policy.find_escapees for g in groups):
                table = self._scan_table(groups)
                candidates.update(table)
            else:
                for g in adopted:
                    for pid in _descendants(g.pid):
                        candidates.setdefault(pid, None)
        escapees: list[_Group] = []
        for pid, pgid in candidates.items():
            if pid in known or pid == me:
                continue
            if pgid is None:
                try:
                    pgid = os.getpgid(pid)
                except OSError:
                    continue
            owner = by_pgid.get(pgid)
            if owner is not None:
                owner.add_member(pid)
            else:
                escapees.append(self._escapee(pid, pgid))
                known.add(pid)
        return escapees

    def _scan_table(self, groups: Iterable[_Group]) -> dict[int, int | None]:
        """Processes of this session found by a /proc scan: pid → pgid."""
        table = _scan()
        pgids = {g.pgid for g in groups if g.pgid is not None}
        roots = {g.pid for g in groups}
        me = os.getpid()
        found: dict[int, int | None] = {}
        for pid, (_state, ppid, pgid) in table.items():
            if pid == me:
                continue
            if (
                pgid in pgids
                or self._descends(pid, ppid, roots, table)
                or (has_in_environ(pid, self._marker))
            ):
                found[pid] = pgid
        return found

    @staticmethod
    def _descends(
        pid: int, ppid: int, roots: set[int], table: Mapping[int, tuple[str, int, int]]
    ) -> bool:
        seen = 0
        while ppid > 1 and seen < 64:
            if ppid in roots:
                return True
            entry = table.get(ppid)
            if entry is None:
                return False
            ppid = entry[1]
            seen += 1
        return False

    def _escapee(self, pid: int, pgid: int | None) -> _Group:
        g = _Group(
            self,
            pid,
            pgid=pgid,
            command=_cmdline(pid),
            own=False,
            policy=self.policy,
            escaped=True,
        )
        # Never killpg an escapee's group: no zombie of ours pins that pgid, so it may be
        # anyone's by the time we signal. Its pidfd is safe.
        g.group_empty = True
        return g

    # -- the end of a stop

    def _maybe_cgroup_kill(self) -> None:
        """SIGKILL the whole cgroup once no group of the stop is still in its grace."""
        cg = self._cgroup
        if cg is None or any(g.stage == "term" for g in self._stopping):
            return
        try:
            cg.kill()
        except OSError as exc:
            self._record(
                PROCESS_SIGNAL,
                {"target": "cgroup", "signal": "SIGKILL", "result": _result(exc)},
            )
            return
        self._cgroup_killed = True
        self._record(
            PROCESS_SIGNAL,
            {"target": "cgroup", "signal": "SIGKILL", "result": "sent", "path": cg.path},
        )

    def _group_settled(self, _group: _Group) -> None:
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._finished or any(g.stage in ("term", "kill") for g in self._stopping):
            return
        leftovers = self._leftovers()
        if leftovers and self._rounds < _VERIFY_ROUNDS:
            self._rounds += 1
            now = time.monotonic()
            for g in leftovers:
                self._stopping.append(g)
                self._record(
                    PROCESS_ESCAPED,
                    {"pid": g.pid, "pgid": g.pgid, "command": list(g.command), "found": "verify"},
                )
            self._maybe_cgroup_kill()
            for g in leftovers:
                g.start_stop(now, kill_now=True)
            return
        cg = self._cgroup
        if cg is not None and cg.populated():
            # Processes still leaving the cgroup (exit in progress): look again shortly,
            # bounded by the kill timeout.
            now = time.monotonic()
            if not self._recheck_until:
                self._recheck_until = now + self.policy.kill_timeout
            if now < self._recheck_until:
                if self._recheck is None:
                    self._recheck = self.loop.call_later(_POLL_MIN, self._recheck_fire)
                return
            for g in self._stopping:
                g.survived = g.survived or bool(g.alive())
            self._record(PROCESS_SIGNAL, {"target": "cgroup", "result": "still populated"})
        self._finish()

    def _recheck_fire(self) -> None:
        self._recheck = None
        self._maybe_finish()

    def _leftovers(self) -> list[_Group]:
        """Processes of the stop still alive after every group settled."""
        known = {g.pid for g in self._stopping}
        for g in self._stopping:
            known.update(g.members)
        me = os.getpid()
        cg = self._cgroup
        if cg is not None:
            pids = [p for p in cg.procs() if p not in known and p != me]
            found: dict[int, int | None] = dict.fromkeys(pids)
        elif any(g.policy.find_escapees for g in self._stopping):
            found = {
                p: pgid
                for p, pgid in self._scan_table(g for g in self._stopping if not g.escaped).items()
                if p not in known
            }
        else:
            found = {}
        out: list[_Group] = []
        for pid, pgid in found.items():
            if not _alive(pid):
                continue
            if pgid is None:
                try:
                    pgid = os.getpgid(pid)
                except OSError:
                    continue
            owner = next((g for g in self._stopping if g.pgid == pgid and not g.escaped), None)
            g = self._escapee(pid, pgid)
            if owner is not None:
                # Forked into the group after the first signal: a member, found late.
                g.escaped = False
            out.append(g)
        return out

    def _finish(self) -> None:
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        for g in self._stopping:
            g.reap()
            if g.leader.exited_at is not None and not g.escaped:
                self._record(
                    PROCESS_EXITED,
                    {
                        "pid": g.pid,
                        "pgid": g.pgid,
                        "returncode": g.returncode,
                        "signals": list(g.signals),
                    },
                )
            if g.process is not None:
                g.process._close_pipes()
            if not g.survived:
                g.close()
                self._untrack(g)
        self._finished = True
        if not any(g.survived for g in self._stopping):
            # rmdir of a cgroup takes ~100 us: after the stop is reported, not before.
            self.loop.call_soon(self._drop_cgroup)
        self._done.set()

    # -- side channels

    def _record(self, kind: str, details: dict[str, Any]) -> None:
        self.session.record(kind, details=details)

    def _warn(self, message: str) -> None:
        try:
            warnings.warn(message, EscalationWarning, stacklevel=2)
        except Exception as exc:  # warnings-as-errors must not stop the ladder
            self.session.note_secondary(f"EscalationWarning raised: {exc!r}")


def _plane(session: PlaneHost, policy: EscalationPolicy) -> ProcessPlane:
    """The session's process plane, created (and registered) on first use.

    Raises:
        Interrupted: the session was interrupted: nothing new may start.
        RuntimeError: not on the session's loop thread, or the session has ended.
    """
    if not session.on_loop_thread():
        raise RuntimeError("processes must be started on the session's event loop thread")
    if session.request is not None:
        raise session.interrupted_error()
    if session.state in ("terminated", "finished", "failed"):
        raise RuntimeError(f"session {session.id} has ended ({session.state})")
    return session.plane(ProcessPlane, lambda: ProcessPlane(session, policy))


def _check_policy(escalation: EscalationPolicy | None) -> EscalationPolicy:
    if escalation is None:
        return _DEFAULT_POLICY
    if not isinstance(escalation, EscalationPolicy):
        raise TypeError(f"escalation must be an EscalationPolicy, not {type(escalation).__name__}")
    return escalation


_DEFAULT_POLICY = EscalationPolicy()


# ------------------------------------------------------------------------- the pipes


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


class _ReceiveStream(anyio.abc.ByteReceiveStream):
    """A pipe from the child, read without blocking; closing it never waits for EOF."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._fd = file.fileno()
        os.set_blocking(self._fd, False)
        self._closed = False

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

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _notify_closing(self._fd)
            self._file.close()

    async def aclose(self) -> None:
        self.close()
        await anyio.lowlevel.checkpoint()


class _SendStream(anyio.abc.ByteSendStream):
    """A pipe to the child, written without blocking; closing it never waits."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._fd = file.fileno()
        os.set_blocking(self._fd, False)
        self._closed = False

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

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _notify_closing(self._fd)
            with contextlib.suppress(OSError):  # EPIPE flushing nothing: already closed
                self._file.close()

    async def aclose(self) -> None:
        self.close()
        await anyio.lowlevel.checkpoint()


# ------------------------------------------------------------------ the process object


class TrackedProcess(anyio.abc.Process):
    """A subprocess in its own process group, stopped with its session.

    Usable like anyio's ``Process``. ``aclose()`` closes the pipes (without waiting for
    EOF) and waits for the process; cancelled (not by the session's interrupt, which
    stops the process through its ladder), it SIGKILLs the whole group and waits for it,
    shielded and bounded by the policy's ``kill_timeout``.
    """

    def __init__(self, group: _Group, popen: subprocess.Popen[bytes]) -> None:
        self._group = group
        self._stdin = _SendStream(popen.stdin) if popen.stdin is not None else None
        self._stdout = _ReceiveStream(popen.stdout) if popen.stdout is not None else None
        self._stderr = _ReceiveStream(popen.stderr) if popen.stderr is not None else None

    def __repr__(self) -> str:
        return f"<TrackedProcess pid={self.pid} pgid={self.pgid} returncode={self.returncode}>"

    @property
    def pid(self) -> int:
        return self._group.pid

    @property
    def pgid(self) -> int | None:
        """The process group the session's interrupt signals."""
        return self._group.pgid

    @property
    def returncode(self) -> int | None:
        return self._group.returncode

    @property
    def stdin(self) -> anyio.abc.ByteSendStream | None:
        return self._stdin

    @property
    def stdout(self) -> anyio.abc.ByteReceiveStream | None:
        return self._stdout

    @property
    def stderr(self) -> anyio.abc.ByteReceiveStream | None:
        return self._stderr

    async def wait(self) -> int:
        """Wait until the process exits (not its pipes: a grandchild may hold them).

        A checkpoint. Raises ``RuntimeError`` if the exit status could not be collected.
        """
        group = self._group
        if group.reaped:
            await anyio.lowlevel.checkpoint()
        else:
            if group.exited is None:
                group.exited = anyio.Event()
            await group.exited.wait()
        if group.returncode is None:
            raise RuntimeError(f"exit status of process {self.pid} is unknown: {group.error}")
        return group.returncode

    def send_signal(self, sig: signal.Signals) -> None:
        """Send *sig* to the process (not its group), unless it has exited."""
        self._group.leader.send(sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _kill_group(self) -> None:
        group = self._group
        if group.reaped or group.stage != "running":
            return
        group.signal(signal.SIGKILL)

    def _close_pipes(self) -> None:
        for stream in (self._stdin, self._stdout, self._stderr):
            if stream is not None:
                stream.close()

    async def aclose(self) -> None:
        self._close_pipes()
        try:
            await self.wait()
        except BaseException:
            if not self._group.plane._delivered:
                # Cancelled by someone other than the interrupt (a timeout, say): take
                # the whole group down, not just the child as anyio does.
                self._kill_group()
                with anyio.move_on_after(self._group.policy.kill_timeout, shield=True):
                    await self.wait()
            raise


# ------------------------------------------------------------------------ entry points


def _check_command(command: object) -> tuple[str | bytes | Sequence[Any], bool, tuple[str, ...]]:
    if isinstance(command, (str, bytes)):
        if not command.strip():
            raise ValueError("command must not be empty")
        return command, True, (os.fsdecode(command),)
    if isinstance(command, os.PathLike):
        return [command], False, (os.fsdecode(command),)
    if not isinstance(command, Sequence):
        raise TypeError(
            f"command must be a str or a sequence of str/bytes/paths, not {type(command).__name__}"
        )
    args = list(command)
    if not args:
        raise ValueError("command must not be empty")
    for arg in args:
        if not isinstance(arg, (str, bytes, os.PathLike)):
            raise TypeError(f"command arguments must be str, bytes or paths, not {arg!r}")
    return args, False, tuple(os.fsdecode(a) for a in args)


async def open_process(
    session: PlaneHost,
    command: str | bytes | Sequence[str | bytes | os.PathLike[str]],
    *,
    stdin: int | IO[Any] | None = PIPE,
    stdout: int | IO[Any] | None = PIPE,
    stderr: int | IO[Any] | None = PIPE,
    cwd: str | bytes | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    user: str | int | None = None,
    group: str | int | None = None,
    extra_groups: Iterable[str | int] | None = None,
    umask: int = -1,
    escalation: EscalationPolicy | None = None,
) -> TrackedProcess:
    """Start *command* in a new process group that *session*'s interrupt stops.

    A checkpoint before the process starts, none after: once it runs, it is tracked,
    so a cancellation can never orphan it.

    Raises:
        ValueError / TypeError: an empty or malformed command, a bad policy.
        OSError: the command could not be started (``FileNotFoundError``, ...).
        Interrupted: the session was interrupted; nothing was started.
    """
    args, shell, shown = _check_command(command)
    policy = _check_policy(escalation)
    await anyio.lowlevel.checkpoint_if_cancelled()
    plane = _plane(session, policy)
    child_env = dict(os.environ if env is None else env)
    child_env[TRACKING_ENV] = session.id
    cg = plane._ensure_cgroup()

    def spawn(preexec: Callable[[], None] | None) -> subprocess.Popen[bytes]:
        # Popen on the loop thread, as asyncio's own subprocess transport does: fork+exec
        # is quick, and with no await after it a started process is always tracked.
        return subprocess.Popen(
            args,
            shell=shell,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            env=child_env,
            pass_fds=pass_fds,
            user=user,
            group=group,
            extra_groups=extra_groups,
            umask=umask,
            start_new_session=True,
            # preexec_fn is one write(2) into cgroup.procs: the child is in the cgroup
            # before it can fork (Python 3.11 has no clone3(CLONE_INTO_CGROUP)).
            preexec_fn=preexec,
        )

    try:
        if cg is not None:
            try:
                popen = spawn(cg.enter_from_child)
            except subprocess.SubprocessError as exc:
                # The child could not enter the cgroup: fall back and say so.
                plane._cgroup_failed(f"a child could not join the cgroup: {exc}")
                popen = spawn(None)
        else:
            popen = spawn(None)
    except BaseException:
        # Nothing started: an idle plane keeps no cgroup.
        if not plane._groups and not plane._delivered:
            plane._drop_cgroup()
        raise
    tracked = _Group(
        plane, popen.pid, pgid=popen.pid, command=shown, own=True, policy=policy, popen=popen
    )
    process = TrackedProcess(tracked, popen)
    tracked.process = process
    plane._record(
        PROCESS_STARTED,
        {
            "pid": popen.pid,
            "pgid": popen.pid,
            "command": list(shown),
            "containment": plane.containment,
        },
    )
    plane.track(tracked)
    return process


def track_pid(session: PlaneHost, pid: int, *, escalation: EscalationPolicy | None = None) -> None:
    """Adopt *pid*, started by other means, so that *session*'s interrupt stops it.

    Its process group is signalled only if *pid* leads it (and it is not ours); its
    descendants are found when the interrupt comes. It is not reaped here (its parent
    does that); its exit status is read when it is a child of this process.

    Raises:
        TypeError / ValueError: *pid* is not a positive int, or is this process.
        ProcessLookupError: no such process.
        Interrupted: the session was interrupted.
    """
    positive_int("pid", pid)
    if pid <= 1 or pid == os.getpid():
        raise ValueError(f"cannot track pid {pid}")
    policy = _check_policy(escalation)
    plane = _plane(session, policy)
    if pid in plane._groups:
        return
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        raise ProcessLookupError(f"no process {pid}") from None
    is_leader = pgid == pid and pgid != os.getpgrp()
    own = False
    st = _stat(pid)
    if st is not None and st[1] == os.getpid():
        own = False  # our child, but its Popen/asyncio watcher reaps it, not us
    tracked = _Group(
        plane,
        pid,
        pgid=pgid if is_leader else None,
        command=_cmdline(pid),
        own=own,
        policy=policy,
        adopted=True,
    )
    plane._record(
        PROCESS_STARTED,
        {"pid": pid, "pgid": pgid, "command": list(tracked.command), "adopted": True},
    )
    plane.track(tracked)


async def run_process(
    session: PlaneHost,
    command: Command,
    *,
    input: bytes | None = None,
    check: bool = True,
    **options: Unpack[ProcessArgs],
) -> subprocess.CompletedProcess[bytes]:
    """Run *command* to completion in a tracked process group and collect its output.

    Returns when the process exits, even if a grandchild still holds its stdout: what is
    in the pipes then is collected, later output of descendants is not.

    Raises:
        subprocess.CalledProcessError: *check* and a nonzero exit status.
        ValueError: both *stdin* and *input* given; see ``open_process``.
    """
    stdin: StdIO = options.pop("stdin", None)
    stdout = options.setdefault("stdout", PIPE)
    stderr = options.setdefault("stderr", PIPE)
    if stdin is not None and input is not None:
        raise ValueError("only one of stdin and input is allowed")
    output = BytesIO()
    errors = BytesIO()

    async def drain(stream: anyio.abc.ByteReceiveStream, sink: BytesIO) -> None:
        async for chunk in stream:
            sink.write(chunk)

    async def feed(stream: anyio.abc.ByteSendStream, data: bytes) -> None:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await stream.send(data)
        await stream.aclose()

    options["stdin"] = PIPE if input else stdin
    async with await open_process(session, command, **options) as process:
        async with anyio.create_task_group() as tg:
            if process._stdout is not None:
                tg.start_soon(drain, process._stdout, output)
            if process._stderr is not None:
                tg.start_soon(drain, process._stderr, errors)
            if process._stdin is not None and input:
                tg.start_soon(feed, process._stdin, input)
            await process.wait()
            tg.cancel_scope.cancel()
        # The leader has exited: take what is in the pipes, never wait for an EOF that
        # a surviving grandchild may hold back.
        if process._stdout is not None:
            output.write(process._stdout.read_available())
        if process._stderr is not None:
            errors.write(process._stderr.read_available())
    returncode = process.returncode
    assert returncode is not None
    out = output.getvalue() if stdout == PIPE else None
    err = errors.getvalue() if stderr == PIPE else None
    if check and returncode != 0:
        raise subprocess.CalledProcessError(returncode, command, out, err)
    return subprocess.CompletedProcess(command, returncode, out, err)
