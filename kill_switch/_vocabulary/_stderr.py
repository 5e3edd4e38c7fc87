"""The last-resort channel: one line to the process's standard error, never raising.

Written to file descriptor 2 with one ``os.write``, not through ``sys.stderr``: the
watchdog writes here while other threads may be stuck holding ``sys.stderr``'s lock
(or the stream may have been replaced or closed), and the audit writer's fallback must
still reach whatever collects the process's stderr (systemd, a container runtime)
when Python-level streams are gone.
"""

from __future__ import annotations

import contextlib
import os


def say(text: str) -> None:
    """Write *text* (plus a newline if it lacks one) to fd 2; silently nothing if fd 2
    is closed: there is nowhere left to report to."""
    if not text.endswith("\n"):
        text += "\n"
    with contextlib.suppress(OSError):
        os.write(2, text.encode("utf-8", "backslashreplace"))
