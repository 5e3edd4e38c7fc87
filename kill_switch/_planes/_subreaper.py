"""This process as a child subreaper (Linux ``prctl(PR_SET_CHILD_SUBREAPER)``).

An orphan is reparented to its nearest ancestor that is a child subreaper instead of to
PID 1: a tree whose middle process exits stays under this process, where ``/proc`` still
finds it. The flag is process-wide; kill_switch sets it only for a synthetic drill
(``run_drills``, ``kill-switch drill``), so that an orphan a session left behind is
caught, and reaps the orphans of a stop that were reparented to it whoever set it.

Hand-written with ``ctypes``: the standard library has no ``prctl``, and the packages
that wrap it are unmaintained; these are two calls with integer arguments.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


@cache
def _prctl() -> Any:  # the C function, or None off Linux
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # this process: libc is loaded already
    return libc.prctl


def is_subreaper() -> bool:
    """Whether this process is a child subreaper (``False`` off Linux)."""
    prctl = _prctl()
    if prctl is None:
        return False
    flag = ctypes.c_int(0)
    if prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) != 0:
        return False
    return bool(flag.value)


def set_subreaper(on: bool) -> None:
    """Make this process a child subreaper, or stop being one.

    Raises:
        OSError: not Linux, or the call failed.
    """
    prctl = _prctl()
    if prctl is None:
        raise OSError("a child subreaper needs Linux")
    if prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def subreaper() -> Iterator[bool]:
    """Within: this process is a child subreaper (as it was after); yields whether it
    could be made one (not off Linux)."""
    before = is_subreaper()
    try:
        set_subreaper(True)
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        if not before:
            set_subreaper(False)
