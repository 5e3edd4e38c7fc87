"""Cleanup hooks and rollback of half-done work, run shielded and bounded."""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal

import anyio

from ._vocabulary._exceptions import Interrupted
from ._vocabulary._report import CleanupReport

if TYPE_CHECKING:
    from types import TracebackType

    from ._vocabulary._plane import PlaneHost

Hook = Callable[[], "Awaitable[object] | object"]


def _hook_name(fn: object, name: str | None) -> str:
    if name is not None:
        return name
    got = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return got if isinstance(got, str) else repr(fn)


def check_hook(fn: object) -> None:
    """Raises: TypeError: *fn* is not callable."""
    if not callable(fn):
        raise TypeError(f"a cleanup or rollback hook must be callable, got {fn!r}")


async def run_hooks(
    session: PlaneHost,
    hooks: list[tuple[str, Hook]],
    kind: Literal["cleanup", "rollback"],
) -> list[CleanupReport]:
    """Run *hooks* in reverse order of registration, each exactly once.

    Each hook is shielded and bounded on its own by ``session.policy.cleanup_timeout``:
    a hung hook is left behind at its deadline (a sync one keeps running in its
    abandoned worker thread) and reported ``timed_out``; a failing one is reported
    ``failed``; neither keeps the others from running. Async hooks run on the loop,
    sync hooks in a worker thread so that the loop can leave them behind.
    """
    reports: list[CleanupReport] = []
    timeout = session.policy.cleanup_timeout
    while hooks:
        name, fn = hooks.pop()
        started = time.monotonic()
        outcome: Literal["ran", "failed", "timed_out"] = "ran"
        error: str | None = None
        with anyio.move_on_after(timeout, shield=True) as scope:
            try:
                if inspect.iscoroutinefunction(fn):
                    await fn()
                else:
                    result = await anyio.to_thread.run_sync(fn, abandon_on_cancel=True)
                    if inspect.isawaitable(result):
                        await result
            # Interrupted too (a BaseException): a hook that checks the stopped session.
            except (Exception, Interrupted) as exc:  # reported, and the next hook still runs
                outcome, error = "failed", repr(exc)
        if scope.cancelled_caught:
            outcome, error = "timed_out", f"still running after {timeout} s; left behind"
        report = CleanupReport(name, kind, outcome, time.monotonic() - started, error)
        reports.append(report)
        session.record(
            kind,
            reason=error,
            details={"hook": name, "outcome": outcome, "seconds": report.seconds},
        )
    return reports


class Transaction:
    """Compensations for half-done work: ``async with session.transaction() as tx``.

    Register an undo with ``tx.on_rollback(fn)`` after each step that changed the world.
    Leaving the block normally commits (the undos are dropped); leaving it because of an
    exception, a cancellation, or with the session interrupted rolls back: the undos run
    in reverse order, exactly once, shielded and bounded, and their outcomes go to the
    session's ``StopReport.cleanup`` and the audit. Exceptions are never swallowed.
    """

    def __init__(self, session: PlaneHost) -> None:
        self._session = session
        self._undo: list[tuple[str, Hook]] = []
        #: ``open`` → ``committed`` or ``rolled_back``.
        self.state: Literal["open", "committed", "rolled_back"] = "open"

    def on_rollback(self, fn: Hook, *, name: str | None = None) -> None:
        """Undo the step just done if the transaction does not commit.

        Raises:
            TypeError: *fn* is not callable.
            RuntimeError: the transaction is no longer open.
        """
        check_hook(fn)
        if self.state != "open":
            raise RuntimeError(f"transaction already {self.state}")
        self._undo.append((_hook_name(fn, name), fn))

    def commit_point(self) -> None:
        """Raise ``Interrupted`` if the session was interrupted: call it right before a
        side effect that must not happen after a kill (a fence)."""
        session = self._session
        if session.request is not None:
            raise session.interrupted_error()

    async def __aenter__(self) -> Transaction:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None and self._session.request is None:
            self.state = "committed"
            self._undo.clear()
            return
        self.state = "rolled_back"
        # Each compensation is shielded and bounded on its own; this bound is their sum.
        budget = (len(self._undo) + 1) * self._session.policy.cleanup_timeout
        with anyio.move_on_after(budget, shield=True):
            reports = await run_hooks(self._session, self._undo, "rollback")
            self._session.note_cleanup(reports)
