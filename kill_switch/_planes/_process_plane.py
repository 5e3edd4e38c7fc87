"""The process plane of one session: tracking, discovery, verify, force (a ``Plane``).

Every process a session starts gets its own process group (``start_new_session=True``),
the session's marker in its environment (``KILL_SWITCH_SESSION``), and, where cgroup v2
is writable, a place in the session's own cgroup before it can fork. On interrupt each
tracked group goes down the ladder of its ``EscalationPolicy`` (``_escalation``)::

    find members          cgroup.procs, or a /proc scan (pgid, parent chain, marker)
    the ladder            SIGTERM → grace → SIGKILL, per tracked group
    verify                cgroup.kill + ``populated 0``, or a last /proc scan; what is
                          found then is stopped too, for a bounded number of rounds
    reap                  each leader, after the last signal to its group

Invariants:

* Everything runs on the event loop thread, in callbacks (pidfd readers, timers): a
  stop creates no task, and ``deliver`` never blocks. Only ``force`` runs on any thread.
* An escapee's group is never signalled with ``killpg``: no zombie of ours pins that
  pgid, so it may be anyone's by the time we signal. Its pidfd is safe.
* The session cgroup is removed only when the plane is idle (nothing tracked, or the
  stop finished with no survivor): an idle plane keeps no cgroup.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import warnings
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import anyio

from kill_switch._vocabulary._audit_event import (
    PROCESS_CONTAINMENT,
    PROCESS_ESCAPED,
    PROCESS_EXITED,
    PROCESS_SIGNAL,
)
from kill_switch._vocabulary._plane import Plane, StopFields
from kill_switch._vocabulary._snapshots import ProcessInfo

from ._cgroup import CgroupUnavailable, SessionCgroup
from ._escalation import EscalationPolicy, EscalationWarning, TrackedGroup
from ._pid_watch import POLL_MIN, signal_result
from ._procfs import alive as _alive
from ._procfs import cmdline as _cmdline
from ._procfs import descendants as _descendants
from ._procfs import has_in_environ
from ._procfs import scan as _scan
from ._subreaper import is_subreaper

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Iterable, Mapping

    from kill_switch._vocabulary._plane import ForcePath, PlaneHost
    from kill_switch._vocabulary._report import InterruptRequest

#: Environment variable carrying the session id into every process the session starts;
#: descendants inherit it, which finds escapees when no cgroup is available.
TRACKING_ENV: Final = "KILL_SWITCH_SESSION"

Containment = Literal["cgroup", "process_group"]

_VERIFY_ROUNDS = 3


class PendingSpawn(Protocol):
    """A process started by other means whose child is not adopted yet (``_adopt``)."""

    def settle_now(self) -> bool:
        """Adopt the child if it exists now; whether it did."""
        ...


class ProcessPlane(Plane):
    """The processes of one session and how its interrupt stops them (a ``Plane``).

    Created by the session's first ``open_process`` / ``track_pid``. Loop thread only.
    """

    def __init__(self, session: PlaneHost, policy: EscalationPolicy) -> None:
        self.session = session
        self.loop = session.loop
        self.policy = policy
        self._groups: dict[int, TrackedGroup] = {}
        self._stopping: list[TrackedGroup] = []
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
        #: Spawns seen by ``_adopt`` whose child is not adopted yet: resolved first at a
        #: stop.
        self._spawns: set[PendingSpawn] = set()
        #: Spawns in the session's context that could not be attributed (why, each): the
        #: stop cannot be quiescent.
        self.unattributed: list[str] = []

    # -- containment

    def ensure_cgroup(self) -> SessionCgroup | None:
        """The session cgroup for the next child, created on first use; ``None`` where
        the policy declines it or cgroup v2 is not writable (audited once, with why)."""
        if self._cgroup is not None or not self._want_cgroup:
            return self._cgroup
        try:
            self._cgroup = SessionCgroup.create(f"{os.getpid()}-{os.urandom(6).hex()}")
        except CgroupUnavailable as exc:
            self._want_cgroup = False
            self._cgroup_reason = str(exc)
            self.record(PROCESS_CONTAINMENT, {"containment": "process_group", "reason": str(exc)})
            return None
        if self.containment != "cgroup":
            self.containment = "cgroup"
            self.record(PROCESS_CONTAINMENT, {"containment": "cgroup", "path": self._cgroup.path})
        return self._cgroup

    def cgroup_failed(self, reason: str) -> None:
        """A child could not enter the cgroup: fall back to process groups for good."""
        self._want_cgroup = False
        self._cgroup_reason = reason
        self.containment = "process_group"
        self.record(PROCESS_CONTAINMENT, {"containment": "process_group", "reason": reason})
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
            delay = max(POLL_MIN, delay * 2)
            self.loop.call_later(delay, self._drop_cgroup, delay)

    # -- processes started by other means (``_adopt``)

    def expect(self, spawn: PendingSpawn) -> None:
        """*spawn* is under way in the session's context: a stop adopts its child first."""
        self._spawns.add(spawn)

    def forget(self, spawn: PendingSpawn) -> None:
        """*spawn*'s child was adopted, or it has none."""
        self._spawns.discard(spawn)

    def hold(self, pid: int) -> Containment:
        """Move adopted *pid* into the session cgroup where there is one, so that what it
        forks from then on is held; how it is held."""
        cg = self.ensure_cgroup()
        if cg is None:
            return "process_group"
        cg.add_soon(pid, self._not_held)
        return "cgroup"

    def _not_held(self, pid: int, exc: OSError) -> None:
        """The cgroup mover's thread: *pid* could not be moved in; audit it on the loop
        (its tree is still found through /proc at the stop)."""
        details = {
            "pid": pid,
            "containment": "process_group",
            "reason": f"could not move it into the cgroup: {exc.strerror or exc}",
        }
        with contextlib.suppress(RuntimeError):  # the loop closed: the session is over
            self.loop.call_soon_threadsafe(self.record, PROCESS_CONTAINMENT, details)

    # -- tracking

    @property
    def delivered(self) -> bool:
        """Whether the session's interrupt has reached this plane."""
        return self._delivered

    def is_tracked(self, pid: int) -> bool:
        """Whether *pid* leads a group this plane tracks."""
        return pid in self._groups

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

    def track(self, group: TrackedGroup) -> None:
        """Track *group*; one tracked after the interrupt is SIGKILLed at once."""
        self._groups[group.pid] = group
        if self._delivered:
            # A process tracked after the interrupt was delivered is stopped at once.
            self._stopping.append(group)
            self._finished = False
            group.start_stop(time.monotonic(), kill_now=True)

    def untrack(self, group: TrackedGroup) -> None:
        """Forget *group* (it exited by itself, or its stop is over)."""
        if self._groups.get(group.pid) is group:
            del self._groups[group.pid]
        self.release_idle_cgroup()

    def release_idle_cgroup(self) -> None:
        """Drop the session cgroup if nothing is tracked and no stop has begun."""
        if not self._groups and not self._delivered:
            self._drop_cgroup()

    # -- Plane protocol

    def deliver(self, request: InterruptRequest) -> None:
        """Start the ladder for every tracked group. Loop thread; never blocks."""
        if self._delivered:
            return
        for spawn in list(self._spawns):
            # Children of spawns not adopted yet join the stop like the others (SIGTERM
            # first); one still being forked is adopted, and killed, when it appears.
            spawn.settle_now()
        self._delivered = True
        now = time.monotonic()
        groups = [g for g in self._groups.values() if g.stage == "running"]
        escapees = self._discover(groups)
        self._stopping.extend(groups)
        self._stopping.extend(escapees)
        for g in escapees:
            self.record(
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
        return (
            self._done.is_set()
            and not any(g.survived for g in self._stopping)
            and not self.unattributed
        )

    def stop_fields(self) -> StopFields:
        """One ``ProcessReport`` per process of the stop."""
        return StopFields(
            processes=tuple(g.report() for g in self._stopping),
            unattributed=tuple(self.unattributed),
        )

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
                result = signal_result(exc)
            self.record(
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
                result = signal_result(exc)
            group.signals.append("SIGKILL")
            self.record(
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

    def _discover(self, groups: list[TrackedGroup]) -> list[TrackedGroup]:
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
        #: descendants of an adopted process that leads no group of its own: its members
        tree_of: dict[int, TrackedGroup] = {}
        if adopted:
            if cg is None and any(g.policy.find_escapees for g in groups):
                table = self._scan_table(groups)
                candidates.update(table)
            for g in adopted:
                if g.adopted or cg is not None:
                    for pid in _descendants(g.pid):
                        candidates.setdefault(pid, None)
                        if g.adopted and g.pgid is None:
                            tree_of.setdefault(pid, g)
        escapees: list[TrackedGroup] = []
        for pid, pgid in candidates.items():
            if pid in known or pid == me:
                continue
            pgid = _pgid_of(pid, pgid)
            if pgid is None:
                continue
            owner = by_pgid.get(pgid) or tree_of.get(pid)
            if owner is not None:
                owner.add_member(pid)
            else:
                escapees.append(self._escapee(pid, pgid))
                known.add(pid)
        return escapees

    def _scan_table(self, groups: Iterable[TrackedGroup]) -> dict[int, int | None]:
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

    def _escapee(self, pid: int, pgid: int | None) -> TrackedGroup:
        g = TrackedGroup(
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

    def maybe_cgroup_kill(self) -> None:
        """SIGKILL the whole cgroup once no group of the stop is still in its grace."""
        cg = self._cgroup
        if cg is None or any(g.stage == "term" for g in self._stopping):
            return
        try:
            cg.kill()
        except OSError as exc:
            self.record(
                PROCESS_SIGNAL,
                {"target": "cgroup", "signal": "SIGKILL", "result": signal_result(exc)},
            )
            return
        self._cgroup_killed = True
        self.record(
            PROCESS_SIGNAL,
            {"target": "cgroup", "signal": "SIGKILL", "result": "sent", "path": cg.path},
        )

    def group_settled(self, _group: TrackedGroup) -> None:
        """A group of the stop is done: finish the stop once all are."""
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
                self.record(
                    PROCESS_ESCAPED,
                    {"pid": g.pid, "pgid": g.pgid, "command": list(g.command), "found": "verify"},
                )
            self.maybe_cgroup_kill()
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
                    self._recheck = self.loop.call_later(POLL_MIN, self._recheck_fire)
                return
            for g in self._stopping:
                g.survived = g.survived or bool(g.alive())
            self.record(PROCESS_SIGNAL, {"target": "cgroup", "result": "still populated"})
        self._finish()

    def _recheck_fire(self) -> None:
        self._recheck = None
        self._maybe_finish()

    def _leftovers(self) -> list[TrackedGroup]:
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
        out: list[TrackedGroup] = []
        for pid, pgid in found.items():
            if not _alive(pid):
                continue
            pgid = _pgid_of(pid, pgid)
            if pgid is None:
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
        # Orphans of the stop reparented to this process (a child subreaper) are its
        # zombies now: reap them, or they would pile up.
        orphans_are_ours = is_subreaper()
        for g in self._stopping:
            g.reap()
            if orphans_are_ours:
                g.reap_orphans()
            if g.leader.exited_at is not None and not g.escaped:
                self.record(
                    PROCESS_EXITED,
                    {
                        "pid": g.pid,
                        "pgid": g.pgid,
                        "returncode": g.returncode,
                        "signals": list(g.signals),
                    },
                )
            if g.process is not None:
                g.process.close_pipes()
            if not g.survived:
                g.close()
                self.untrack(g)
        self._finished = True
        if not any(g.survived for g in self._stopping):
            # rmdir of a cgroup takes ~100 us: after the stop is reported, not before.
            self.loop.call_soon(self._drop_cgroup)
        self._done.set()

    # -- side channels

    def record(self, kind: str, details: dict[str, Any]) -> None:
        """Audit *kind* through the session."""
        self.session.record(kind, details=details)

    def warn(self, message: str) -> None:
        """Emit an ``EscalationWarning``; one raised as an error is noted, not raised."""
        try:
            warnings.warn(message, EscalationWarning, stacklevel=2)
        except Exception as exc:  # warnings-as-errors must not stop the ladder
            self.session.note_secondary(f"EscalationWarning raised: {exc!r}")


def _pgid_of(pid: int, known: int | None) -> int | None:
    """*known*, else *pid*'s process group now (``None``: it has gone)."""
    if known is not None:
        return known
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def plane_for(session: PlaneHost, policy: EscalationPolicy) -> ProcessPlane:
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
