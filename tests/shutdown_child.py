"""A child process for the shutdown and watchdog tests (run as a script, not collected).

usage: shutdown_child.py MODE DB TRACEBACK_FILE
"""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path

import anyio

import kill_switch as ks
from kill_switch._planes import _cgroup

MODE, DB, TB = sys.argv[1], sys.argv[2], sys.argv[3]


def regex_holding_the_gil() -> None:
    # Catastrophic backtracking: the re engine holds the GIL for the whole match.
    re.match(r"(a+)+$", "a" * 64 + "b")


def keep(_self: _cgroup.SessionCgroup, timeout: float) -> bool:
    """``remove_when_empty`` that removes nothing (the negative control's)."""
    return False


async def hang() -> None:
    await anyio.sleep_forever()


async def main() -> int:
    policy = ks.StopPolicy(cleanup_timeout=3600.0)
    async with ks.Runtime(audit=DB, policy=policy) as runtime:
        async with ks.graceful_shutdown(runtime, deadline=1.0, traceback_file=TB) as shutdown:
            async with runtime.session("agent") as session:
                if MODE in ("hung_cleanup", "two_signals"):
                    session.on_cleanup(hang, name="hung")
                elif MODE == "gil_regex":
                    session.on_cleanup(regex_holding_the_gil, name="regex")
                elif MODE == "non_daemon":
                    threading.Thread(target=time.sleep, args=(3600,), daemon=False).start()
                elif MODE.startswith("stuck_loop"):
                    if MODE == "stuck_loop_keeps_cgroup":
                        # Negative control: the forced stop does not remove the cgroup.
                        _cgroup.SessionCgroup.remove_when_empty = keep  # type: ignore[method-assign,assignment]
                    proc = await session.open_process(["sleep", "1000"])
                    Path(DB + ".pid").write_text(f"{proc.pid}\n")  # noqa: ASYNC240 - a test child
                print("ready", flush=True)
                if MODE.startswith("stuck_loop"):
                    # The loop's thread blocks (on purpose): only the watchdog can act.
                    time.sleep(3600)  # noqa: ASYNC251
                await anyio.sleep_forever()
    print(f"orderly exit {shutdown.exit_code}", flush=True)
    return shutdown.exit_code or 0


sys.exit(anyio.run(main))
