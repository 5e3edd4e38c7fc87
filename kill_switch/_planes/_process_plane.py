"""The process plane of one session: tracking, discovery, verify, force (a ``Plane``).

Every process a session starts gets its own process group (``start_new_session=True``),
the session's marker in its environment (``KILL_SWITCH_SESSION``), and, where cgroup v2
is writable, a place in the session's own cgroup before it can fork. On interrupt each
tracked group goes down the ladder of its ``EscalationPolicy`` (``_escalation``)::

    grace timer           one per plane, armed before any signal, at the request's time
                          plus the grace (not at the time the loop delivered it)
    SIGTERM               killpg of each tracked group
    find the rest         after the SIGTERMs: with the session cgroup, one read of
                          cgroup.procs (a process outside the tracked groups, an escapee,
                          gets its SIGTERM by pidfd); without it, a /proc scan (pgid,
                          parent chain, marker) or the children files
    SIGKILL               at the grace: killpg of each group still in its grace, then
                          ``cgroup.kill``
    done                  the leaders' pidfds (one epoll set, ``_pid_watch``) and
                          ``populated 0`` (inotify on ``cgroup.events``, opened with the
                          cgroup; polled where inotify is not to be had); without a
                          cgroup, a pidfd per member and a last /proc scan, whatever is
                          found then stopped too, for a bounded number of rounds
    reap                  each leader, after the last signal to its group
    close                 pipes, pidfds and the cgroup once the stop's handle resolved:
                          off the path between interrupt() and the report

With the cgroup, a stop of N trees costs the loop O(N) signals that keep the GIL and a
handful of calls that release it (each of which may wait up to the switch interval for
the GIL back when another thread is CPU-bound): no pidfd or epoll registration per member,
no /proc reads per pid, nothing closed before the report.

Invariants:

* Everything runs on the event loop thread, in callbacks (pidfd readers, timers): a
  stop creates no task, and ``deliver`` never blocks. Only ``force`` runs on any thread.
* Every process gets SIGTERM before SIGKILL, an escapee inside the cgroup included.
* An escapee's group is never signalled with ``killpg``: no zombie of ours pins that
  pgid, so it may be anyone's by the time we signal. Its pidfd is safe.
* The session cgroup lives as long as the session: made at its first process, kept
  while the plane is idle, removed once empty when the block ends (``close``) or the
  stop's handle resolved with no survivor. A cgroup per spawn cost a spawn up to 4x its
  time (``bench_spawn_hook.py``): the loop's inotify instance, closed with the last
  watch, waits in the kernel for an SRCU grace period, and the removal waits for the
  mover thread's migration.
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
from ._pid_watch import POLL_MAX, POLL_MIN, PidWatcher, signal_result
from ._procfs import alive as _alive
from ._procfs import children as _children
from ._procfs import cmdline as _cmdline
from ._procfs import descendants as _descendants
from ._procfs import has_in_environ
from ._procfs import scan as _scan
from ._procfs import stat as _stat
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

#: The kernel sends at most one ``cgroup.events`` notification per 10 ms (a jiffy more
#: with its rounding; ``CGROUP_FILE_NOTIFY_MIN_INTV``) and delays one that comes sooner.
#: Within this long of the last one, a stop that waits for ``populated 0`` also polls.
_NOTIFY_MARGIN: Final = 0.025

#: How long the watchdog's forced stop waits for ``cgroup.kill`` to empty the session
#: cgroup before it removes it (the watchdog leaves an action behind after 0.2 s).
_FORCED_REMOVE_WAIT: Final = 0.15


class PendingSpawn(Protocol):
    """A process started by other means whose child is not adopted yet (``_adopt``)."""

    #: what was spawned, for the report while its child has not appeared
    what: str

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
        #: the pidfds of this plane's processes, in one epoll set
        self.watcher = PidWatcher(self.loop)
        self._groups: dict[int, TrackedGroup] = {}
        self._stopping: list[TrackedGroup] = []
        self._delivered = False
        self._delivering = False
        self._finished = False
        #: Set (and dropped) when the stop may have settled: its groups finished, or the
        #: last pending spawn resolved. ``settle`` re-checks and waits on a new one.
        self._settled_maybe: anyio.Event | None = None
        self._rounds = 0
        self._recheck: asyncio.TimerHandle | None = None
        self._recheck_until = 0.0
        self._request_mono = 0.0
        self._grace_timer: asyncio.TimerHandle | None = None
        self._grace_when = float("inf")
        self._cleanup_armed = False
        self._marker = f"\0{TRACKING_ENV}={session.id}\0".encode()
        self._cgroup: SessionCgroup | None = None
        #: whether the session cgroup may hold a process: set when a child enters it,
        #: cleared by inotify (or a poll) reading ``populated 0``
        self._populated = False
        #: inotify reports the cgroup's changes (else ``_populated`` is polled)
        self._cgroup_watched = False
        self._cgroup_poll: asyncio.TimerHandle | None = None
        self._cgroup_poll_delay = POLL_MIN
        #: when the kernel last notified a change of ``cgroup.events`` (at the latest)
        self._cgroup_notified = float("-inf")
        self.containment: Containment = "process_group"
        self._cgroup_reason = "disabled by EscalationPolicy(cgroup=False)"
        self._want_cgroup = policy.cgroup
        #: the session's block has ended (``close``): no cgroup is made from now on
        self._closed = False
        #: Spawns seen by ``_adopt`` whose child is not adopted yet: resolved first at a
        #: stop.
        self._spawns: set[PendingSpawn] = set()
        #: Spawns in the session's context that could not be attributed (why, each): the
        #: stop cannot be quiescent.
        self.unattributed: list[str] = []

    # -- containment

    def ensure_cgroup(self) -> SessionCgroup | None:
        """The session cgroup for the next child, created on first use; ``None`` where
        the policy declines it, cgroup v2 is not writable (audited once, with why) or the
        session's block has ended."""
        if self._closed:
            return None
        if self._cgroup is not None or not self._want_cgroup:
            return self._cgroup
        try:
            self._cgroup = SessionCgroup.create(f"{os.getpid()}-{os.urandom(6).hex()}")
        except CgroupUnavailable as exc:
            self._want_cgroup = False
            self._cgroup_reason = str(exc)
            self.record(PROCESS_CONTAINMENT, {"containment": "process_group", "reason": str(exc)})
            return None
        self._populated = False
        # Opened with the cgroup, off any stop's path; without inotify, polled.
        self._cgroup_watched = self._cgroup.watch(self.loop, self._cgroup_changed)
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

    def _keeps_cgroup(self) -> bool:
        """Whether an idle session cgroup is kept: for the session's life, unless the
        plane fell back to process groups."""
        return self._want_cgroup and not self._closed

    def _drop_cgroup(self, delay: float = 0.0) -> None:
        """Remove the idle session cgroup; while processes are still leaving it, retry
        with back-off for about a second. Processes that keep running in it keep it:
        audited (``still populated``) once the plane is closed, as a stop's end does."""
        cg = self._cgroup
        if cg is None or self._groups:
            return
        if cg.remove():
            self._cgroup = None
            self._cgroup_watched = False
            self._populated = False
        elif delay < 0.5:
            delay = max(POLL_MIN, delay * 2)
            self.loop.call_later(delay, self._drop_cgroup, delay)
        elif self._closed:
            self.record(
                PROCESS_SIGNAL,
                {
                    "target": "cgroup",
                    "result": "still populated",
                    "path": cg.path,
                    "pids": cg.procs(),
                },
            )

    def close(self) -> None:
        """The session's block has ended: remove the session cgroup once it is empty (at
        once, usually). After a stop, its handle's resolution removes it (``_after_stop``).
        Loop thread; never raises for a cgroup that cannot be removed (audited)."""
        if self._closed:
            return
        self._closed = True
        if not self._delivered:
            self._drop_cgroup()

    # -- processes started by other means (``_adopt``)

    def expect(self, spawn: PendingSpawn) -> None:
        """*spawn* is under way in the session's context: a stop adopts its child first."""
        self._spawns.add(spawn)

    def forget(self, spawn: PendingSpawn) -> None:
        """*spawn*'s child was adopted, or it has none."""
        self._spawns.discard(spawn)
        if not self._spawns:
            self._wake_settle()

    def spawns_pending(self) -> bool:
        """Whether a spawn of the session is under way whose child is not adopted yet
        (it may still be being forked): a stop is not quiescent until it resolves."""
        return bool(self._spawns)

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

    def _cgroup_changed(self, populated: bool, *, polled: bool = False) -> None:
        """``cgroup.events`` changed (inotify), or a poll read it."""
        if not polled:
            self._cgroup_notified = time.monotonic()
        self._populated = populated
        if populated:
            return
        if self._delivered:
            if not self._finished:
                now = time.monotonic()
                for g in self._stopping:
                    if g.contained:
                        g.cgroup_emptied(now)
                self._maybe_finish()
        elif not self._groups and not self._keeps_cgroup():
            self._drop_cgroup()

    def cgroup_holds_processes(self) -> bool:
        """Whether the session cgroup may still hold a process of the stop (inotify's last
        word). Where inotify may be late or is missing, a poll reads ``cgroup.events``
        (at once, then with back-off) until it says empty."""
        if self._cgroup is None or not self._populated:
            return False
        if self._cgroup_poll is None and not self._notify_prompt():
            self._cgroup_poll_delay = 0.0
            self._cgroup_poll = self.loop.call_later(0.0, self._poll_cgroup)
        return True

    def _notify_prompt(self) -> bool:
        """Whether inotify will report ``populated 0`` as it happens (not rate-limited)."""
        return self._cgroup_watched and (time.monotonic() - self._cgroup_notified > _NOTIFY_MARGIN)

    def _poll_cgroup(self) -> None:
        self._cgroup_poll = None
        cg = self._cgroup
        if cg is None or self._finished or not self._populated:
            return
        if not cg.populated():
            self._cgroup_changed(False, polled=True)
        elif not self._notify_prompt():
            self._cgroup_poll_delay = min(POLL_MAX, max(POLL_MIN, self._cgroup_poll_delay * 2))
            self._cgroup_poll = self.loop.call_later(self._cgroup_poll_delay, self._poll_cgroup)

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
        """Track *group*; one tracked after the interrupt is SIGKILLed at once.

        A process this plane started while its cgroup is in use joined the cgroup before
        its exec: it is ``contained`` (a caller that put a process there itself may say
        so before calling this).
        """
        if group.own and self.containment == "cgroup" and self._cgroup is not None:
            group.contained = True
        if group.contained:
            if not self._populated:
                # The kernel notified the entry just now (inotify's word may be queued).
                self._cgroup_notified = time.monotonic()
            self._populated = True
        self._groups[group.pid] = group
        if self._delivered:
            # A process tracked after the interrupt was delivered is stopped at once.
            self._stopping.append(group)
            self._finished = False
            group.start_stop(time.monotonic(), kill_now=True)
            self.maybe_cgroup_kill()

    def untrack(self, group: TrackedGroup) -> None:
        """Forget *group* (it exited by itself, or its stop is over)."""
        if self._groups.get(group.pid) is group:
            del self._groups[group.pid]
        self.release_idle_cgroup()

    def release_idle_cgroup(self) -> None:
        """Drop the session cgroup if nothing is tracked, no stop has begun, and it is no
        longer kept for the session (the block has ended, or the plane fell back)."""
        if not self._groups and not self._delivered and not self._keeps_cgroup():
            self._drop_cgroup()

    # -- Plane protocol

    def deliver(self, request: InterruptRequest) -> None:
        """Start the ladder for every tracked group. Loop thread; never blocks.

        The grace timer first (counted from the request), then a SIGTERM to each group,
        then what the SIGTERMs could not reach by group: the session cgroup's other
        processes, or (without a cgroup) a /proc search.
        """
        if self._delivered:
            return
        for spawn in list(self._spawns):
            # Children of spawns not adopted yet join the stop like the others (SIGTERM
            # first); one still being forked is adopted, and killed, when it appears, and
            # the stop waits for it (``settle``).
            spawn.settle_now()
        self._delivered = True
        self._delivering = True
        self._request_mono = request.requested_mono
        groups = [g for g in self._groups.values() if g.stage == "running"]
        self._stopping.extend(groups)
        for g in groups:
            g.deadline = self._request_mono + g.grace()
            g.stage = "term"  # in its grace from now on: the timer counts it
        self._arm_grace()
        loose = [g for g in groups if not g.contained]
        # The children files are read before the SIGTERMs: a leader that has exited has
        # none, and its orphans would be out of reach. A /proc scan is made after them.
        # An adopted process that leads no group of its own: its tree is walked even
        # where a scan follows (the scan finds descendants by their parent chain, which
        # its exit breaks).
        walk = (
            loose if not self._scans(loose) else [g for g in loose if g.adopted and g.pgid is None]
        )
        walked = self._walk(walk) if walk else {}
        now = time.monotonic()
        try:
            for g in groups:
                g.start_stop(now)
            # Bookkeeping after every SIGTERM is out: it waits on the kernel, they do not.
            if self._cgroup is not None and self._populated:
                self._sweep_cgroup(now, walked)
            if loose:
                self._discover(loose, now, walked)
        finally:
            self._delivering = False
        self._maybe_finish()

    # -- the grace

    def _arm_grace(self) -> None:
        """(Re)arm the plane's one grace timer for the earliest group still in its grace."""
        pending = [g.deadline for g in self._stopping if g.stage == "term" and not g.graced]
        when = min(pending, default=float("inf"))
        if self._grace_timer is not None:
            if self._grace_when <= when:
                return
            self._grace_timer.cancel()
            self._grace_timer = None
        if when == float("inf"):
            return
        self._grace_when = when
        self._grace_timer = self.loop.call_later(
            max(0.0, when - time.monotonic()), self._grace_over
        )

    def _grace_over(self) -> None:
        """SIGKILL each group whose grace is over and that still has a process, then the
        cgroup as a whole (which also takes a process forked out of its group after the
        cgroup was searched: it had no SIGTERM, as a process forked into a group after
        its killpg had none)."""
        self._grace_timer = None
        self._grace_when = float("inf")
        now = time.monotonic()
        due = [
            g for g in self._stopping if g.stage == "term" and not g.graced and g.deadline <= now
        ]
        if due:
            left = self._cgroup_members() if any(g.contained for g in due) else {}
            for g in due:
                if g.contained:
                    pids = left.get(g.pgid, ()) if g.pgid is not None else ()
                    g.seen.update(p for p in pids if p != g.pid)
                    if not pids and not g.alive():
                        # Nothing of it outlived the grace: no SIGKILL in its row.
                        g.hold()
                        continue
                g.escalate()
            self.maybe_cgroup_kill()
        self._arm_grace()

    def _cgroup_members(self) -> dict[int | None, list[int]]:
        """The session cgroup's processes now, by process group (one read; the rare
        path of a grace that ran out)."""
        cg = self._cgroup
        out: dict[int | None, list[int]] = {}
        if cg is None:
            return out
        me = os.getpid()
        for pid in cg.procs():
            if pid != me:
                out.setdefault(_pgid_of(pid, None), []).append(pid)
        return out

    def _settled(self) -> bool:
        """Every stopped group is reaped and verified, and no spawn is still pending (its
        child, once it appears, is tracked and stopped: the stop is not over)."""
        return self._finished and not self.spawns_pending()

    def _wake_settle(self) -> None:
        event = self._settled_maybe
        if event is not None:
            self._settled_maybe = None
            event.set()

    async def settle(self, deadline: float) -> None:
        """Wait until every stopped group is reaped and verified and no spawn of the
        session is pending, or until *deadline*.

        A spawn pending at the stop resolves when its child appears (it is then adopted
        and killed, which restarts the wait for its group) or when its search gives up.
        Woken by those events, never by polling. Cancellation: a checkpoint.
        """
        if not self._delivered:
            return
        with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
            while not self._settled():
                if self._settled_maybe is None:
                    self._settled_maybe = anyio.Event()
                await self._settled_maybe.wait()

    def quiescent(self) -> bool:
        """Every process of the stop is gone (none survived, the stop is verified, no
        spawn is still coming)."""
        return (
            self._settled()
            and not any(g.survived for g in self._stopping)
            and not self.unattributed
        )

    def stop_fields(self) -> StopFields:
        """One ``ProcessReport`` per process of the stop; spawns still pending are
        ``unattributed`` (their child had not appeared: it may run after the report)."""
        pending = (
            tuple(
                f"{s.what}: its process had not appeared when the report was built "
                "(adopted and killed when it does)"
                for s in self._spawns
            )
            if self.spawns_pending()
            else ()
        )
        return StopFields(
            processes=tuple(g.report() for g in self._stopping),
            unattributed=(*self.unattributed, *pending),
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
        if cg is not None and path == "watchdog":
            # The process exits next (``os._exit``), and no loop will remove the cgroup
            # after it: remove it here once the kill has emptied it (bounded: the
            # watchdog gives this action 0.2 s).
            self._remove_before_exit(cg)

    def _remove_before_exit(self, cg: SessionCgroup) -> None:
        """Remove *cg* from this (watchdog) thread once empty; audit one that stays."""
        if cg.remove_when_empty(_FORCED_REMOVE_WAIT):
            return
        self.record(
            PROCESS_SIGNAL,
            {
                "target": "cgroup",
                "result": "still populated",
                "path": cg.path,
                "pids": cg.procs(),
                "via": "watchdog",
            },
        )

    # -- discovery (after the SIGTERMs)

    def _known(self) -> set[int]:
        """The pids the stop already has: leaders, escapees, members."""
        known = {os.getpid()}
        for g in self._stopping:
            known.add(g.pid)
            known.update(g.members)
            known.update(g.seen)
        return known

    def _sweep_cgroup(self, now: float, walked: dict[int, TrackedGroup]) -> None:
        """Sort the session cgroup's processes after the SIGTERMs: a member of a tracked
        group is noted; any other (an escapee inside the cgroup) gets its own SIGTERM."""
        cg = self._cgroup
        if cg is None:
            return
        by_pgid = {g.pgid: g for g in self._stopping if g.pgid is not None and not g.escaped}
        self._sort_found(dict.fromkeys(cg.procs()), by_pgid, walked, now)

    def _scans(self, groups: list[TrackedGroup]) -> bool:
        """Whether these groups' processes are searched by a /proc scan (no cgroup, and
        the policy asks for it) rather than through the children files."""
        return self._cgroup is None and any(g.policy.find_escapees for g in groups)

    @staticmethod
    def _walk(groups: list[TrackedGroup]) -> dict[int, TrackedGroup]:
        """The live descendants of *groups*' leaders (children files): pid → the group
        whose leader it descends from."""
        found: dict[int, TrackedGroup] = {}
        for g in groups:
            for pid in _descendants(g.pid):
                found.setdefault(pid, g)
        return found

    def _discover(
        self, groups: list[TrackedGroup], now: float, walked: dict[int, TrackedGroup]
    ) -> None:
        """Sort the members and escapees of groups outside the cgroup (adopted, or no
        cgroup), *walked* before the SIGTERMs or scanned now. Escapees get a SIGTERM."""
        by_pgid = {g.pgid: g for g in groups if g.pgid is not None}
        # pid -> pgid (None: look it up)
        candidates: dict[int, int | None] = dict.fromkeys(walked)
        if self._scans(groups):
            candidates.update(self._scan_table(groups))
        self._sort_found(candidates, by_pgid, walked, now)

    def _sort_found(
        self,
        candidates: Mapping[int, int | None],
        by_pgid: Mapping[int, TrackedGroup],
        walked: Mapping[int, TrackedGroup],
        now: float,
    ) -> None:
        """Each pid found (pid → pgid, ``None``: look it up) the stop does not know yet:
        a member of its process group's tracked group or of an adopted leader's tree,
        else an escapee, which gets a SIGTERM of its own."""
        known = self._known()
        escapees: list[TrackedGroup] = []
        for pid, known_pgid in candidates.items():
            if pid in known:
                continue
            pgid = _pgid_of(pid, known_pgid)
            if pgid is None:
                continue  # gone already
            owner = by_pgid.get(pgid) or _tree_owner(walked, pid)
            if owner is not None:
                owner.found_member(pid)
            else:
                escapees.append(self._escapee(pid, pgid))
            known.add(pid)
        self._start_escapees(escapees, now, "deliver")

    def _start_escapees(self, escapees: list[TrackedGroup], now: float, found: str) -> None:
        """SIGTERM each escapee; the plane's grace timer (from the request) SIGKILLs it."""
        for g in escapees:
            self._stopping.append(g)
            g.deadline = self._request_mono + g.grace()
            self.record(
                PROCESS_ESCAPED,
                {"pid": g.pid, "pgid": g.pgid, "command": list(g.command), "found": found},
            )
        for g in escapees:
            g.start_stop(now)
        if escapees:
            self._arm_grace()

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
        if cg is None or not self._populated:
            return
        if any(g.stage == "term" and not g.graced for g in self._stopping):
            return
        try:
            cg.kill()
        except OSError as exc:
            self.record(
                PROCESS_SIGNAL,
                {"target": "cgroup", "signal": "SIGKILL", "result": signal_result(exc)},
            )
            return
        self.record(
            PROCESS_SIGNAL,
            {"target": "cgroup", "signal": "SIGKILL", "result": "sent", "path": cg.path},
        )

    def group_settled(self, _group: TrackedGroup) -> None:
        """A group of the stop is done: finish the stop once all are."""
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if (
            self._finished
            or self._delivering
            or any(g.stage in ("term", "kill") for g in self._stopping)
        ):
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
            for g in leftovers:
                g.graced = True
                g.start_stop(now, kill_now=True)
            self.maybe_cgroup_kill()
            return
        if self._cgroup is not None and self._cgroup_busy():
            # Processes still leaving the cgroup (exit in progress): wait for inotify's
            # word (or poll), bounded by the kill timeout.
            now = time.monotonic()
            if not self._recheck_until:
                self._recheck_until = now + self.policy.kill_timeout
            if now < self._recheck_until:
                if self._recheck is None:
                    delay = self._recheck_until - now if self._cgroup_watched else POLL_MIN
                    self._recheck = self.loop.call_later(delay, self._recheck_fire)
                return
            for g in self._stopping:
                g.survived = g.survived or bool(g.alive())
            self.record(PROCESS_SIGNAL, {"target": "cgroup", "result": "still populated"})
        self._finish()

    def _cgroup_busy(self) -> bool:
        """Whether the session cgroup holds a process (inotify's last word, or a read)."""
        cg = self._cgroup
        if cg is None:
            return False
        if not self._cgroup_watched and self._populated:
            self._populated = cg.populated()
        return self._populated

    def _recheck_fire(self) -> None:
        self._recheck = None
        self._maybe_finish()

    def _leftovers(self) -> list[TrackedGroup]:
        """Processes of the stop still alive after every group settled: in the cgroup
        (only while it is not known empty), or by a /proc scan without one."""
        known = self._known()
        cg = self._cgroup
        if cg is not None:
            if not self._cgroup_busy():
                return []
            found: dict[int, int | None] = dict.fromkeys(p for p in cg.procs() if p not in known)
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
        """Reap, audit, report done; closing waits for the handle (``_after_stop``)."""
        for timer in (self._recheck, self._grace_timer, self._cgroup_poll):
            if timer is not None:
                timer.cancel()
        self._recheck = self._grace_timer = self._cgroup_poll = None
        self._grace_when = float("inf")
        for g in self._stopping:
            g.reap()
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
        if is_subreaper():
            # Orphans of the stop reparented to this process are its zombies now.
            self._reap_orphans()
        self._finished = True
        self._wake_settle()
        if not self._cleanup_armed:
            self._cleanup_armed = True
            self.session.handle.add_done_callback(self.loop, self._after_stop)

    def _reap_orphans(self) -> None:
        """Reap the processes of the stop reparented to this process (a child
        subreaper): its zombies now, which no one else will ever wait for.

        Ours to reap: a zombie child of this process still in a stopped group (a
        process group id stays allocated while any member, a zombie included, holds it,
        so it cannot be anyone else's), or a pid the stop knows, but never an adopted
        process (its ``Popen`` or asyncio watcher reaps it).
        """
        pgids = {g.pgid for g in self._stopping if g.pgid is not None}
        known = self._known()
        # An adopted process is its own Popen's to wait for: never steal its status.
        theirs = {g.pid for g in self._stopping if g.adopted}
        for pid in _children(os.getpid()):
            if pid in theirs:
                continue
            st = _stat(pid)
            if st is None or st.state != "Z" or (st.pgid not in pgids and pid not in known):
                continue
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG)

    def _after_stop(self) -> None:
        """The stop's handle has resolved: close pipes and pidfds, drop the cgroup.

        Each of these calls releases the GIL; made after the report, none of them can
        delay it.
        """
        self._cleanup_armed = False
        if not self._finished:
            return  # a process tracked late restarted the stop: its end comes back here
        for g in self._stopping:
            if g.process is not None:
                g.process.close_pipes()
            if not g.survived:
                g.close()
                self.untrack(g)
        if not any(g.survived for g in self._stopping):
            self._drop_cgroup()

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


def _tree_owner(walked: Mapping[int, TrackedGroup], pid: int) -> TrackedGroup | None:
    """The adopted process leading no group of its own that *pid* descends from."""
    g = walked.get(pid)
    return g if g is not None and g.adopted and g.pgid is None else None


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
