"""The process plane: tracked subprocess trees and their SIGTERM → grace → SIGKILL ladder.

(Being built: see issue "Stop what runs outside the event loop".)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._session import Session


async def open_process(session: Session, command: Any, **kwargs: Any) -> Any:
    """Start *command* in a new process group tracked by *session*."""
    raise NotImplementedError("the process plane is not built yet")
