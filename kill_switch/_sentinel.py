"""The sentinel: detectors watching each session's stream of guard events.

Every tool call the guard admits (``on_call``), every call that ends (``on_outcome``)
and every call a tool policy denies (``on_denied``) is shown to the session's
detectors. A detector keeps incremental state (no scans) and returns an ``Alert`` when
its metric crosses its threshold. In ``enforce`` mode a ``critical`` alert interrupts
the session (trigger ``sentinel``, the reason names the metric); ``observe`` mode only
audits. Alerts from one detector are rate-limited by a cooldown, and the built-in
detectors re-arm only once their metric has fallen back below a lower level
(hysteresis), so a flapping metric does not spam the audit.

Detectors are synchronous and must be cheap: each event's dispatch is timed, and one
that takes longer than ``Sentinel.max_detector_seconds`` counts as a failure, like a
detector that raises. A failure fails closed (interrupt with reason ``sentinel_error``)
unless the sentinel is configured ``fail_open=True``: then the failing detector is
switched off for that session and a ``sentinel_error`` audit event says so.
"""

from __future__ import annotations

import collections
import copy
import time
from typing import TYPE_CHECKING, Any, Final, Literal

import attrs

from ._vocabulary._audit_event import SENTINEL_ALERT, SENTINEL_ERROR
from ._vocabulary._validate import attrs_check, positive, positive_int, seconds

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ._vocabulary._plane import PlaneHost

Severity = Literal["info", "warning", "critical"]
Mode = Literal["observe", "enforce"]

_RANK: Final = {"info": 0, "warning": 1, "critical": 2}


@attrs.frozen
class Alert:
    """A detector's finding: *metric* reached *value*, past *threshold*."""

    detector: str
    metric: str
    severity: Severity = attrs.field(validator=attrs.validators.in_(tuple(_RANK)))
    value: float
    threshold: float
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return attrs.asdict(self)


class Detector:
    """Base of sentinel detectors; override the hooks you need (the others cost nothing).

    A detector instance given to a ``Sentinel`` is a template: each session gets its
    own copy (``fresh()``, a deep copy by default), so state is per session. Hooks run
    on the event loop thread, synchronously, inside the guard: keep them O(1).
    ``now`` is the sentinel's clock (monotonic seconds).
    """

    #: the detector's name in alerts and audit events.
    name: str = "detector"
    #: whether ``on_outcome`` wants calls that succeeded too (``False``: errors only;
    #: ``SessionWatch.successes`` counts the others, cheaply).
    wants_success: bool = True

    def attach(self, watch: SessionWatch) -> None:
        """Called once with the session's watch, after ``fresh()``."""

    def on_call(
        self, tool: str, args: tuple[Any, ...], kwargs: Mapping[str, Any], cost: float, now: float
    ) -> Alert | None:
        """A tool call is being admitted."""
        return None

    def on_outcome(self, tool: str, error: BaseException | None, now: float) -> Alert | None:
        """A tool call ended: *error* is the exception it raised (``None``: it returned)."""
        return None

    def on_denied(self, tool: str, now: float) -> Alert | None:
        """A tool policy denied a call."""
        return None

    def fresh(self) -> Detector:
        """A copy with clean state, for one session."""
        return copy.deepcopy(self)


def _rearm(name: str, value: object) -> float:
    v = positive(name, value)
    if v > 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return v


class CallRate(Detector):
    """Call-rate spike: more than *max_calls* calls within a sliding *window* (s).

    O(1) per call: a ring of the last *max_calls* call times; the rate is over when the
    call *max_calls* calls ago is still inside the window. Re-arms once at most
    ``rearm * max_calls`` calls are in the window.
    """

    name = "call_rate"

    def __init__(
        self,
        max_calls: int,
        window: float = 1.0,
        *,
        severity: Severity = "critical",
        rearm: float = 0.5,
    ) -> None:
        positive_int("max_calls", max_calls)
        positive("window", window)
        self.max_calls = max_calls
        self.window = float(window)
        self.severity: Severity = severity
        self.clear = max(1, int(_rearm("rearm", rearm) * max_calls))
        # Grows to max_calls entries, then wraps: memory is bounded by the threshold.
        self._ring: list[float] = []
        self._i = 0
        self._armed = True

    def on_call(
        self, tool: str, args: tuple[Any, ...], kwargs: Mapping[str, Any], cost: float, now: float
    ) -> Alert | None:
        ring = self._ring
        i = self._i
        if len(ring) < self.max_calls:
            ring.append(now)
            self._i = 0 if len(ring) == self.max_calls else i
            return None
        oldest = ring[i]
        ring[i] = now
        self._i = i + 1 if i + 1 < self.max_calls else 0
        if now - oldest < self.window:
            if self._armed:
                self._armed = False
                return Alert(
                    self.name,
                    "calls_per_window",
                    self.severity,
                    self.max_calls + 1,
                    self.max_calls,
                    f"more than {self.max_calls} calls in {self.window:g} s",
                )
        elif not self._armed:
            # The clear-th most recent call (this one is the newest) left the window.
            recent = ring[(self._i - self.clear - 1) % self.max_calls]
            if now - recent >= self.window:
                self._armed = True
        return None


class RepeatedCall(Detector):
    """The same call (tool, args and kwargs equal) made *max_repeats* times in a row:
    an agent stuck in a loop. Re-arms on a different call."""

    name = "repeated_call"

    def __init__(self, max_repeats: int = 20, *, severity: Severity = "critical") -> None:
        positive_int("max_repeats", max_repeats)
        self.max_repeats = max_repeats
        self.severity: Severity = severity
        self._tool: str | None = None
        self._args: tuple[Any, ...] = ()
        self._kwargs: Mapping[str, Any] = {}
        self._count = 0

    def on_call(
        self, tool: str, args: tuple[Any, ...], kwargs: Mapping[str, Any], cost: float, now: float
    ) -> Alert | None:
        try:
            same = tool == self._tool and args == self._args and kwargs == self._kwargs
        except Exception:  # an argument whose == raises is not "the same" call
            same = False
        if same:
            self._count += 1
            if self._count == self.max_repeats:
                return Alert(
                    self.name,
                    "same_call_repeats",
                    self.severity,
                    self._count,
                    self.max_repeats,
                    f"{tool!r} called {self._count} times in a row with the same arguments",
                )
        else:
            self._tool = tool
            self._args = args
            self._kwargs = kwargs
            self._count = 1
        return None


class ErrorStreak(Detector):
    """*max_errors* tool calls in a row ended in an exception. Re-arms on a success.

    Sees only failed calls: a success in between shows as a change of the watch's
    success count, so the hot path of a successful call does not dispatch to it.
    """

    name = "error_streak"
    wants_success = False

    def __init__(self, max_errors: int = 5, *, severity: Severity = "critical") -> None:
        positive_int("max_errors", max_errors)
        self.max_errors = max_errors
        self.severity: Severity = severity
        self._streak = 0
        self._watch: SessionWatch | None = None
        self._successes = 0

    def attach(self, watch: SessionWatch) -> None:
        self._watch = watch

    def on_outcome(self, tool: str, error: BaseException | None, now: float) -> Alert | None:
        if error is None:
            self._streak = 0
            return None
        if self._watch is not None and self._watch.successes != self._successes:
            self._successes = self._watch.successes
            self._streak = 0
        self._streak += 1
        if self._streak == self.max_errors:
            return Alert(
                self.name,
                "errors_in_a_row",
                self.severity,
                self._streak,
                self.max_errors,
                f"{self._streak} failed tool calls in a row, last {tool!r}: {error!r}"[:300],
            )
        return None


class CostVelocity(Detector):
    """Committed cost within a sliding *window* (s) above *max_cost*: spending too fast.

    Re-arms once the windowed cost is at most ``rearm * max_cost``.
    """

    name = "cost_velocity"

    def __init__(
        self,
        max_cost: float,
        window: float = 60.0,
        *,
        severity: Severity = "critical",
        rearm: float = 0.5,
    ) -> None:
        positive("max_cost", max_cost)
        positive("window", window)
        self.max_cost = float(max_cost)
        self.window = float(window)
        self.severity: Severity = severity
        self.clear = _rearm("rearm", rearm) * max_cost
        self._items: collections.deque[tuple[float, float]] = collections.deque()
        self._sum = 0.0
        self._n = 1
        self._armed = True

    def on_call(
        self, tool: str, args: tuple[Any, ...], kwargs: Mapping[str, Any], cost: float, now: float
    ) -> Alert | None:
        if cost:
            self._items.append((now, cost))
            self._sum += cost
            self._n += 1
        # Lazy eviction: the retained sum bounds the windowed one, so old entries are
        # dropped only when that bound says the limit may be crossed, when disarmed, or
        # every 256 costly calls (amortised O(1); memory bounded by the window's calls).
        if self._sum > self.max_cost or not self._n & 255 or not self._armed:
            return self._check(now)
        return None

    def _check(self, now: float) -> Alert | None:
        items = self._items
        horizon = now - self.window
        while items and items[0][0] <= horizon:
            self._sum -= items.popleft()[1]
        if not items:
            self._sum = 0.0  # no float drift left over from an emptied window
        total = self._sum
        if total > self.max_cost:
            if self._armed:
                self._armed = False
                return Alert(
                    self.name,
                    "cost_per_window",
                    self.severity,
                    total,
                    self.max_cost,
                    f"cost {total:g} in {self.window:g} s > {self.max_cost:g}",
                )
        elif total <= self.clear:
            self._armed = True
        return None


class DeniedCalls(Detector):
    """More than *max_denied* calls denied by the tool policy within *window* (s):
    an agent probing for tools it must not use. Re-arms once the window has emptied."""

    name = "denied_calls"

    def __init__(
        self, max_denied: int = 3, window: float = 60.0, *, severity: Severity = "critical"
    ) -> None:
        positive_int("max_denied", max_denied)
        positive("window", window)
        self.max_denied = max_denied
        self.window = float(window)
        self.severity: Severity = severity
        self._times: collections.deque[float] = collections.deque()
        self._armed = True

    def on_denied(self, tool: str, now: float) -> Alert | None:
        times = self._times
        times.append(now)
        horizon = now - self.window
        while times[0] <= horizon:
            times.popleft()
        n = len(times)
        if n > self.max_denied:
            if self._armed:
                self._armed = False
                return Alert(
                    self.name,
                    "denied_per_window",
                    self.severity,
                    n,
                    self.max_denied,
                    f"{n} denied tool calls in {self.window:g} s > {self.max_denied}, "
                    f"last {tool!r}",
                )
        elif n == 1:
            self._armed = True
        return None


def default_detectors() -> tuple[Detector, ...]:
    """The five built-in detectors with their default thresholds."""
    return (
        CallRate(max_calls=50, window=1.0),
        RepeatedCall(max_repeats=20),
        ErrorStreak(max_errors=5),
        CostVelocity(max_cost=10.0, window=60.0),
        DeniedCalls(max_denied=3, window=60.0),
    )


def _detectors(value: object) -> tuple[Detector, ...]:
    if value is None:
        return default_detectors()
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"detectors must be a list or tuple, not {type(value).__name__}")
    for d in value:
        if not isinstance(d, Detector):
            raise TypeError(f"detectors must be Detector instances, got {d!r}")
    return tuple(value)


_seconds = attrs_check(seconds, zero_ok=True)


@attrs.frozen
class Sentinel:
    """How a session is watched: its detectors and what their alerts do.

    Attributes:
        detectors: detector templates (default: the five built-ins); each session gets
            fresh copies.
        mode: ``enforce`` (a critical alert interrupts the session, trigger
            ``sentinel``) or ``observe`` (alerts are audited only).
        fail_open: a detector that raises or overruns is switched off (and audited)
            instead of interrupting the session with reason ``sentinel_error``.
        cooldown: seconds during which further alerts of one detector, of no higher
            severity, are suppressed (counted, not audited).
        max_detector_seconds: time box of one event's dispatch to all detectors,
            measured on *clock* (an injected clock that stands still never trips it).
        on_alert: called with each alert that is not suppressed (must not block; an
            exception from it is a sentinel failure).
        clock: monotonic clock for windows and cooldowns (tests inject one).
    """

    detectors: tuple[Detector, ...] = attrs.field(default=None, converter=_detectors)
    mode: Mode = attrs.field(
        default="enforce", validator=attrs.validators.in_(("observe", "enforce"))
    )
    fail_open: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    cooldown: float = attrs.field(default=30.0, validator=_seconds)
    max_detector_seconds: float = attrs.field(default=0.005, validator=_seconds)
    on_alert: Callable[[Alert], None] | None = attrs.field(default=None, eq=False)
    clock: Callable[[], float] = attrs.field(default=time.monotonic, eq=False, repr=False)

    def watch(self, session: PlaneHost) -> SessionWatch:
        """The live watcher of *session* (fresh detector state)."""
        return SessionWatch(self, session)


def _overrides(d: Detector, hook: str) -> bool:
    return getattr(type(d), hook) is not getattr(Detector, hook)


class SessionWatch:
    """One session's sentinel: fresh detectors, cooldown state, failure handling."""

    __slots__ = (
        "_box",
        "_clock",
        "_last",
        "_on_call",
        "_on_denied",
        "_on_outcome",
        "_on_success",
        "_sentinel",
        "_session",
        "alerts",
        "successes",
        "suppressed",
        "wants_outcome",
    )

    def __init__(self, sentinel: Sentinel, session: PlaneHost) -> None:
        self._sentinel = sentinel
        self._session = session
        self._clock = sentinel.clock
        self._box = sentinel.max_detector_seconds
        detectors = [d.fresh() for d in sentinel.detectors]
        self._on_call = [d for d in detectors if _overrides(d, "on_call")]
        self._on_outcome = [d for d in detectors if _overrides(d, "on_outcome")]
        self._on_denied = [d for d in detectors if _overrides(d, "on_denied")]
        self._on_success = [d for d in self._on_outcome if d.wants_success]
        self.wants_outcome = bool(self._on_outcome)
        #: calls that returned (without an exception) so far.
        self.successes = 0
        for d in detectors:
            d.attach(self)
        #: (detector name) -> (time, severity rank) of its last alert that was audited.
        self._last: dict[str, tuple[float, int]] = {}
        self.alerts: list[Alert] = []
        self.suppressed = 0

    # The three dispatchers repeat one shape on purpose: a shared helper taking a
    # callable would add a call and a closure per detector on the guard's hot path.

    def on_call(
        self, tool: str, args: tuple[Any, ...], kwargs: Mapping[str, Any], cost: float
    ) -> None:
        """Show an admitted call to the detectors. May interrupt the session."""
        if not self._on_call:
            return
        clock = self._clock
        now = clock()
        for d in self._on_call:
            try:
                alert = d.on_call(tool, args, kwargs, cost, now)
            except Exception as exc:  # fail closed (or open, audited): see _fault
                self._fault(d, exc)
                return
            if alert is not None:
                self._alert(alert, now)
        spent = clock() - now
        if spent > self._box:
            self._overrun(self._on_call, spent)

    def on_outcome(self, tool: str, error: BaseException | None) -> None:
        """Show the end of a call to the detectors. May interrupt the session."""
        if error is None:
            self.successes += 1
            hooks = self._on_success
            if not hooks:
                return
        else:
            hooks = self._on_outcome
        clock = self._clock
        now = clock()
        for d in hooks:
            try:
                alert = d.on_outcome(tool, error, now)
            except Exception as exc:  # fail closed (or open, audited): see _fault
                self._fault(d, exc)
                return
            if alert is not None:
                self._alert(alert, now)
        spent = clock() - now
        if spent > self._box:
            self._overrun(hooks, spent)

    def on_denied(self, tool: str) -> None:
        """Show a denied call to the detectors. May interrupt the session."""
        clock = self._clock
        now = clock()
        for d in self._on_denied:
            try:
                alert = d.on_denied(tool, now)
            except Exception as exc:  # fail closed (or open, audited): see _fault
                self._fault(d, exc)
                return
            if alert is not None:
                self._alert(alert, now)
        spent = clock() - now
        if spent > self._box:
            self._overrun(self._on_denied, spent)

    # ------------------------------------------------------------- slow paths

    def _alert(self, alert: Alert, now: float) -> None:
        rank = _RANK[alert.severity]
        last = self._last.get(alert.detector)
        if last is not None and now - last[0] < self._sentinel.cooldown and rank <= last[1]:
            self.suppressed += 1
            return
        self._last[alert.detector] = (now, rank)
        self.alerts.append(alert)
        sentinel = self._sentinel
        enforce = sentinel.mode == "enforce" and alert.severity == "critical"
        session = self._session
        session.record(
            SENTINEL_ALERT,
            trigger="sentinel" if enforce else None,
            reason=alert.message,
            details={**alert.to_dict(), "mode": sentinel.mode, "enforced": enforce},
        )
        if sentinel.on_alert is not None:
            try:
                sentinel.on_alert(alert)
            except Exception as exc:  # the callback is part of the sentinel: same rule
                self._fail(f"on_alert callback raised {exc!r}", None)
        if enforce:
            session.interrupt(
                f"sentinel: {alert.metric}={alert.value:g} (threshold {alert.threshold:g}, "
                f"{alert.detector}): {alert.message}",
                trigger="sentinel",
            )

    def _fault(self, d: Detector, exc: Exception) -> None:
        self._fail(f"detector {d.name!r} raised {exc!r}", d)

    def _overrun(self, detectors: list[Detector], seconds: float) -> None:
        names = ", ".join(repr(d.name) for d in detectors)
        self._fail(
            f"detectors ({names}) took {seconds * 1e3:.1f} ms on one event "
            f"(time box {self._box * 1e3:g} ms)",
            detectors[0] if len(detectors) == 1 else None,
        )

    def _fail(self, what: str, culprit: Detector | None) -> None:
        session = self._session
        if self._sentinel.fail_open:
            if culprit is not None:
                self._disable(culprit)
            session.record(
                SENTINEL_ERROR,
                reason=f"sentinel_error (fail-open): {what}",
                details={"fail_open": True, "disabled": culprit.name if culprit else None},
            )
            return
        session.record(
            SENTINEL_ERROR,
            trigger="sentinel",
            reason=f"sentinel_error: {what}",
            details={"fail_open": False},
        )
        session.interrupt(f"sentinel_error: {what}", trigger="sentinel")

    def _disable(self, d: Detector) -> None:
        for lst in (self._on_call, self._on_outcome, self._on_denied, self._on_success):
            if d in lst:
                lst.remove(d)
        self.wants_outcome = bool(self._on_outcome)
