"""The thread plane: sync tools in worker threads bound to a session.

(Being built: see issue "Stop what runs outside the event loop".)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from ._session import Session

T = TypeVar("T")


async def run_sync(session: Session, fn: Callable[..., T], *args: Any, tool: str | None) -> T:
    """Run *fn* in a worker thread bound to *session*."""
    raise NotImplementedError("the thread plane is not built yet")
