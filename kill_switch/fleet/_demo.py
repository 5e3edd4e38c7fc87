"""The demo's fleet step: a second worker process, its session killed through Redis.

Runs when ``$KILL_SWITCH_FLEET`` names a Redis; says why it is skipped otherwise. The
demo uses a fleet name of its own, so it never touches a real fleet's sessions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import anyio

from kill_switch.fleet._fleet import ENV_KEY, ENV_URL, Fleet, FleetError

if TYPE_CHECKING:
    from collections.abc import Callable

# The second worker: one Runtime in the demo's fleet, one session that waits until it is
# killed; it prints its session id and exits when the session has stopped.
_WORKER = """
import sys, anyio, kill_switch as ks
async def main():
    async with ks.Runtime(fleet=ks.Fleet(sys.argv[1], name=sys.argv[2], lease=2.0)) as rt:
        async with rt.session("remote-researcher", labels={"demo": "fleet"}) as s:
            print(s.id, flush=True)
            await anyio.sleep_forever()
        report = await s.handle
        print("stopped", report.trigger, report.operator, flush=True)
anyio.run(main)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def run(say: Callable[..., None]) -> list[str]:
    """Kill a second worker process's session through the fleet; return failures.

    Skipped (no failure) when ``$KILL_SWITCH_FLEET`` is unset, redis-py is missing or
    Redis does not answer: the demo says which.
    """
    url = os.environ.get(ENV_URL)
    if not url:
        say(f"\nfleet: skipped (set ${ENV_URL} to a Redis URL to kill a second worker process")
        say("       through the fleet)")
        return []
    try:
        import redis  # noqa: F401  # only to say clearly that the extra is missing
    except ImportError:
        say("\nfleet: skipped (redis-py is not installed: pip install 'kill-switch[fleet]')")
        return []
    env = dict(os.environ)
    env.setdefault(ENV_KEY, os.urandom(24).hex())  # a key for this demo only
    name = f"demo-{os.urandom(4).hex()}"
    try:
        fleet = Fleet(url, key=env[ENV_KEY], name=name, timeout=20.0)
        async with fleet:
            pass
    except (FleetError, ValueError) as exc:
        say(f"\nfleet: skipped (Redis at ${ENV_URL} is not usable: {exc})")
        return []
    say(f"\nfleet {name!r} on Redis: a second worker process, killed through the fleet")
    proc = await anyio.open_process(
        [sys.executable, "-c", _WORKER, url, name], env=env, stderr=subprocess.DEVNULL
    )
    failures: list[str] = []
    try:
        assert proc.stdout is not None
        lines = proc.stdout
        with anyio.fail_after(30):
            sid = (await lines.receive()).decode().split()[0]
            async with Fleet(url, key=env[ENV_KEY], name=name, timeout=20.0) as f:
                while not any(s.session_id == sid for s in await f.sessions()):  # noqa: ASYNC110  (another process's state, in Redis)
                    await anyio.sleep(0.05)
                t0 = time.monotonic()
                report = await f.kill(sid, reason="demo: fleet kill", operator="demo-operator")
                took = time.monotonic() - t0
            await proc.wait()
        say(
            f"  pid {proc.pid} session {sid[:12]}: {report.outcome}, "
            f"{'quiescent' if report.quiescent else 'NOT quiescent'}, trigger "
            f"{report.trigger} ({report.operator}), report back in {took * 1e3:.1f} ms"
        )
        if not report.quiescent or report.trigger != "operator":
            failures.append("the fleet kill did not stop the second worker's session")
        if _alive(proc.pid):
            failures.append(f"the second worker (pid {proc.pid}) is still running")
    except (FleetError, TimeoutError) as exc:
        failures.append(f"fleet kill failed: {exc}")
    finally:
        if proc.returncode is None:
            proc.kill()
            with anyio.move_on_after(5, shield=True):
                await proc.wait()
        await proc.aclose()
    return failures
