"""The escalation ladder of one tracked process group: SIGTERM → grace → SIGKILL.

``EscalationPolicy`` says how a session's interrupt stops a tracked group;
``TrackedGroup`` runs that ladder for one process (a leader we started or adopted, or an
escapee) and the members of its process group, and collects its ``ProcessReport``::

    SIGTERM → group       killpg; a group that cannot take it, each live pid by pidfd
    grace                 the group is done early once every member it had has exited
                          (in the session cgroup: its leader, and ``populated 0``)
    SIGKILL → group       when the plane's grace timer says so (one per plane, counted
                          from the request); plus each member already watched, by its
                          pidfd (one that left the group after SIGTERM is out of
                          killpg's reach), an audit event and an ``EscalationWarning``
    verify / give up      settled once every pid is gone, ``survived`` after kill_timeout
    reap                  the leader, with waitpid(pid) - never waitpid(-1)

A group in the session cgroup (``contained``) has no pidfd per member: the cgroup says
when all of them are gone, and its members are listed as the plane saw them after the
SIGTERM (plain pids, never signalled one by one while ``killpg`` reaches the group).

Invariants:

* A leader that is stopped is reaped only after the last signal to its group: its
  zombie pins the pgid, so ``killpg`` can never reach a reused group. A group that
  answered ESRCH is known empty and never signalled again; our own group never is.
* Single pids are signalled through a pidfd where the kernel has one (no PID reuse);
  by pid only while their watch shows them alive.
* Loop thread only: the ladder runs in callbacks (pidfd readers, timers) and never
  blocks.
"""

from __future__ import annotations

import os
import signal
from signal import Signals  # in TrackedGroup, the name signal is its method
from typing import TYPE_CHECKING, Any, Literal

import attrs

from kill_switch._vocabulary._audit_event import PROCESS_EXITED, PROCESS_SIGNAL
from kill_switch._vocabulary._report import ProcessReport
from kill_switch._vocabulary._validate import attrs_check, seconds

from ._pid_watch import PidWatch, signal_result

if TYPE_CHECKING:
    import asyncio
    import subprocess

    import anyio

    from ._process_plane import ProcessPlane
    from ._spawn import TrackedProcess


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


def check_policy(escalation: EscalationPolicy | None) -> EscalationPolicy:
    """*escalation*, or the default policy for ``None``.

    Raises:
        TypeError: not an ``EscalationPolicy``.
    """
    if escalation is None:
        return DEFAULT_POLICY
    if not isinstance(escalation, EscalationPolicy):
        raise TypeError(f"escalation must be an EscalationPolicy, not {type(escalation).__name__}")
    return escalation


DEFAULT_POLICY = EscalationPolicy()


Stage = Literal["running", "term", "kill", "settled", "closed"]


class TrackedGroup:
    """One tracked process (a leader we started or adopted, or an escapee) and the
    members of its process group. Loop thread only."""

    __slots__ = (
        "_timer",
        "adopted",
        "command",
        "contained",
        "deadline",
        "emptied_at",
        "error",
        "escaped",
        "exited",
        "first_signal",
        "graced",
        "group_empty",
        "leader",
        "members",
        "own",
        "pgid",
        "plane",
        "policy",
        "popen",
        "process",
        "reached",
        "reaped",
        "returncode",
        "seen",
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
        self.members: dict[int, PidWatch] = {}
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
        #: in the session cgroup: the plane's ``populated 0`` says when its members are
        #: gone (set by the plane when it tracks the group).
        self.contained = False
        #: members seen in the cgroup after the SIGTERM: reported, not watched.
        self.seen: set[int] = set()
        #: when the session cgroup was seen empty (a contained group's last exit).
        self.emptied_at: float | None = None
        #: the monotonic time of SIGKILL: the request's time plus the grace.
        self.deadline = float("inf")
        #: the plane's grace timer has dealt with this group (SIGKILL, or nothing left).
        self.graced = False
        #: the last killpg reached the group (so members found later had that signal).
        self.reached = False
        self.leader = PidWatch(plane.watcher, pid, self._leader_exited, child=own)

    @property
    def pid(self) -> int:
        return self.leader.pid

    # -- exits

    def _leader_exited(self, _watch: PidWatch) -> None:
        if self.stage == "running":
            # Exited by itself: reap it now and stop tracking it.
            self.reap()
            self.plane.record(
                PROCESS_EXITED,
                {"pid": self.pid, "pgid": self.pgid, "returncode": self.returncode},
            )
            self.close()
            self.plane.untrack(self)
        else:
            self._check_settled()

    def _member_exited(self, _watch: PidWatch) -> None:
        self._check_settled()

    def add_member(self, pid: int) -> PidWatch | None:
        """Watch *pid* as a member of this group (found by discovery); its new watch."""
        if pid in self.members or pid == self.pid:
            return None
        watch = self.members[pid] = PidWatch(
            self.plane.watcher, pid, self._member_exited, child=False
        )
        return watch

    def found_member(self, pid: int) -> None:
        """*pid*, found in this group after its first signal: noted, and watched unless
        the cgroup tells when it is gone; signalled alone if killpg did not reach it."""
        if self.contained and self.reached:
            self.seen.add(pid)
            return
        watch = self.add_member(pid)
        if watch is not None and not self.reached and self.signals:
            self._send_each(Signals[self.signals[-1]], [watch])

    def alive(self) -> list[PidWatch]:
        """The leader and members not seen to exit."""
        watches = [self.leader, *self.members.values()]
        return [w for w in watches if w.exited_at is None]

    # -- the ladder

    def grace(self) -> float:
        """Seconds from the request to SIGKILL (the policy's, else the session's)."""
        grace = self.policy.grace
        return self.plane.session.policy.term_grace if grace is None else grace

    def start_stop(self, now: float, *, kill_now: bool = False) -> None:
        """Start the ladder: SIGTERM (the plane's timer ends the grace), or (*kill_now*)
        SIGKILL at once."""
        self.first_signal = now
        if kill_now:
            self.escalate(warn=False)
            return
        self.stage = "term"
        self.signal(signal.SIGTERM)
        self._check_settled()

    def signal(self, sig: signal.Signals) -> None:
        """Send *sig* to the group (or to each live pid if the group cannot take it).

        SIGKILL also goes to each member already known, one by one: a member can leave
        the group after SIGTERM (``setsid`` in its handler), and ``killpg`` no longer
        reaches it. By pidfd, so a recycled pid is never hit.
        """
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
                result = signal_result(exc)
            else:
                result = "sent"
            self.plane.record(
                PROCESS_SIGNAL,
                {
                    "pid": self.pid,
                    "pgid": pgid,
                    "signal": name,
                    "target": "group",
                    "result": result,
                },
            )
            self.reached = result == "sent"
            if result == "sent":
                if sig == signal.SIGKILL:
                    self.kill_members()
                return
            if result == "esrch":
                # The group is empty (or says so): never signal this pgid again.
                self.group_empty = True
            else:
                self.error = f"killpg({pgid}, {name}): {result}"
        self._send_each(sig, self.alive())

    def kill_members(self) -> None:
        """SIGKILL each member already known and not seen to exit, one by one."""
        self._send_each(signal.SIGKILL, [w for w in self.members.values() if w.exited_at is None])

    def _send_each(self, sig: Signals, watches: list[PidWatch]) -> None:
        name = sig.name
        pgid = self.pgid
        for watch in watches:
            result = watch.send(sig)
            self.plane.record(
                PROCESS_SIGNAL,
                {"pid": watch.pid, "pgid": pgid, "signal": name, "target": "pid", "result": result},
            )
            if result not in ("sent", "exited", "esrch"):
                self.error = f"signal {name} to {watch.pid}: {result}"

    def escalate(self, *, warn: bool = True) -> None:
        """SIGKILL the group (the grace is over), then wait up to ``kill_timeout``.

        The plane kills the session cgroup after it (``cgroup.kill``), once for all the
        groups whose grace ended together.
        """
        self.graced = True
        if self.stage in ("settled", "closed", "kill"):
            return
        self.stage = "kill"
        self.signal(signal.SIGKILL)
        if warn:
            self.plane.warn(
                f"process {self.pid} (group {self.pgid}) of session {self.plane.session.id} "
                f"was still running {self.grace():g} s after the interrupt; sent SIGKILL"
            )
        if self.stage == "kill":
            self._timer = self.plane.loop.call_later(self.policy.kill_timeout, self._give_up)
            self._check_settled()

    def hold(self) -> None:
        """The grace is over and nothing of this (contained) group is left in the cgroup:
        no SIGKILL in its row; it settles on ``populated 0``, or gives up after
        ``kill_timeout`` like an escalated group."""
        self.graced = True
        if self.stage != "term":
            return
        self.stage = "kill"
        self._timer = self.plane.loop.call_later(self.policy.kill_timeout, self._give_up)
        self._check_settled()

    def _give_up(self) -> None:
        self._timer = None
        if self.stage != "kill":
            return
        self.survived = True
        alive = [w.pid for w in self.alive()]
        if self.contained and not alive:
            self.error = self.error or "the session cgroup was still populated after SIGKILL"
        self.error = self.error or f"still running after SIGKILL: {alive}"
        self._settle()

    def cgroup_emptied(self, now: float) -> None:
        """The session cgroup is empty: every member of this (contained) group is gone."""
        if self.emptied_at is None:
            self.emptied_at = now
        self._check_settled()

    def _check_settled(self) -> None:
        if self.stage not in ("term", "kill") or self.alive():
            return
        if self.contained and self.plane.cgroup_holds_processes():
            return
        self._settle()

    def _settle(self) -> None:
        self.stage = "settled"
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.plane.group_settled(self)

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
        """Stop watching: timers cancelled, pidfds closed (idempotent)."""
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
        """This group's row of the stop report."""
        exit_times = [w.exited_at for w in (self.leader, *self.members.values())]
        if self.contained:
            exit_times.append(self.emptied_at)
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
            members=tuple(sorted(self.seen.union(self.members))),
            containment=self.plane.containment,
            adopted=self.adopted,
        )
