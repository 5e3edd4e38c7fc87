"""The operator's control plane: inventory and kill over HTTP, a live dashboard.

Install with the ``server`` extra (``pip install 'kill-switch[server]'``: Starlette and
uvicorn). Mount it in the agent's process, where the sessions are::

    import kill_switch as ks
    from kill_switch import control

    async with ks.Runtime(audit="audit.db") as runtime:
        async with control.serve(runtime, tokens="tokens.txt") as server:
            print(server.url)            # http://127.0.0.1:PORT — the dashboard is at /
            ...                          # run agent sessions

Options come as one ``ControlConfig`` (or as keywords, which build it). The sessions
shown and killed come from a ``SessionSource``: the runtime by default, or
``FleetSource(ks.Fleet(url))`` for every runtime of a fleet on Redis (``kill-switch serve
--fleet``; docs/fleet.md).

The server runs on its own thread and event loop, so it answers and kills even while
the agent's loop is blocked (the interrupt is recorded at once, blocks every later tool
call and thread commit point; the loop-side fan-out runs when the loop next turns).

Roles and endpoints (every refusal of an authenticated caller is audited as
``control_denied`` with the token id, never the token):

====================================  ======  ========  =====  =====
endpoint                              none    viewer    oper.  admin
====================================  ======  ========  =====  =====
GET /, GET /healthz                   200     200       200    200
GET /metrics, /api/sessions[/{id}],   401     200       200    200
/api/audit[/verify], /api/events
POST /api/sessions/{id}/kill,         401     403       200    200
POST /api/kill
GET /api/tokens, POST …/revoke        401     403       403    200
/api/[sessions/{id}/]resume, config,  401     403       403    403
budgets, limits, tools, prompt, …
====================================  ======  ========  =====  =====

There is no endpoint to resume, instruct, re-prompt or reconfigure an agent: terminated
is terminal. Tokens are configured as ``id:role:sha256hex`` lines
(``kill-switch token create --role operator``). No cookie is ever set or read: the
dashboard sends the token in the ``Authorization`` header (kept in sessionStorage), so a
cross-site page cannot make a browser kill anything; state-changing requests that a
browser marks cross-site are refused as well.
"""

from kill_switch._vocabulary._selector import Selector as Selector
from kill_switch.control import _extra  # noqa: F401  (first: a clear ImportError without the server extra

from ._app import ControlApp as ControlApp
from ._auth import ROLES as ROLES
from ._auth import FailureLimiter as FailureLimiter
from ._auth import Principal as Principal
from ._auth import Role as Role
from ._auth import TokenEntry as TokenEntry
from ._auth import TokenStore as TokenStore
from ._auth import hash_token as hash_token
from ._auth import new_token as new_token
from ._config import ControlConfig as ControlConfig
from ._fleet_source import FleetSource as FleetSource
from ._routes import create_app as create_app
from ._server import ControlServer as ControlServer
from ._server import serve as serve
from ._sources import LocalSource as LocalSource
from ._sources import SessionSource as SessionSource

__all__ = [
    "ROLES",
    "ControlApp",
    "ControlConfig",
    "ControlServer",
    "FailureLimiter",
    "FleetSource",
    "LocalSource",
    "Principal",
    "Role",
    "Selector",
    "SessionSource",
    "TokenEntry",
    "TokenStore",
    "create_app",
    "hash_token",
    "new_token",
    "serve",
]
