"""What leaves a session's block: pure functions of the exception and the session id.

A session's block absorbs its own interruption — the cancellation, and ``Interrupted``
or a terminal ``ToolBlocked`` raised because of it — and lets every other exception
through. Kept apart from the session so that the rule can be read (and tested) without
an event loop.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ._exceptions import Interrupted, ToolBlocked

if TYPE_CHECKING:
    from collections.abc import Callable

#: Blocks raised because this session was (or, by that very block, is being) interrupted:
#: leaving the block absorbs them.
OWN_BLOCK_CODES = frozenset({"terminated", "budget", "deadline"})


def is_own(exc: BaseException, session_id: str) -> bool:
    """Whether *exc* was raised because the session *session_id* was interrupted."""
    if isinstance(exc, Interrupted):
        return exc.session_id == session_id
    if isinstance(exc, ToolBlocked):
        return exc.session_id == session_id and exc.decision.code in OWN_BLOCK_CODES
    return False


def absorb(
    exc: BaseException | None, session_id: str, note_secondary: Callable[[str], None]
) -> bool:
    """Whether the block of the interrupted session *session_id* absorbs *exc*.

    An exception group keeps its other members: when only some are the session's own,
    the rest is raised here. An exception raised while the session's cancellation was
    being handled (a tool turning it into ``ValueError``) is absorbed — the stop wins —
    and handed to *note_secondary* so the report keeps it.
    """
    if exc is None or is_own(exc, session_id):
        return True
    if isinstance(exc, BaseExceptionGroup):
        # A lambda, not a bound method or partial: 3.11's split() accepts only a function.
        _, rest = exc.split(lambda e: is_own(e, session_id))
        if rest is None:
            return True
        if rest is not exc:
            raise rest
        return False
    ctx: BaseException | None = exc.__context__
    while ctx is not None:
        if isinstance(ctx, asyncio.CancelledError) or is_own(ctx, session_id):
            note_secondary(repr(exc))
            return True
        ctx = ctx.__context__
    return False


def leave(absorbed: bool, exc: BaseException | None, original: BaseException | None) -> bool:
    """What ``__aexit__`` returns: an exception the block's own machinery raised in
    place of the body's is raised here (returning False would re-raise the body's)."""
    if absorbed or exc is None or exc is original:
        return absorbed
    raise exc
