"""Fleet control on Redis: every runtime's sessions in one inventory, kills from
anywhere, sticky kills and bans, and a dead man's switch (extra ``fleet``).

    async with ks.Runtime(audit="audit.db", fleet=ks.Fleet(url, key=key)) as runtime:
        ...

    async with ks.Fleet(url, key=key) as fleet:
        report = await fleet.kill(session_id, reason="runaway", operator="alice")

Importing this package does not import redis-py: it is imported when a fleet connects.
See docs/fleet.md.
"""

from ._fleet import ENV_KEY as ENV_KEY
from ._fleet import ENV_URL as ENV_URL
from ._fleet import Fleet as Fleet
from ._fleet import FleetError as FleetError
from ._fleet import FleetKillResult as FleetKillResult
from ._fleet import FleetRuntime as FleetRuntime
from ._fleet import FleetSession as FleetSession
from ._fleet import FleetUnavailable as FleetUnavailable
from ._fleet import NoAnswer as NoAnswer

__all__ = [
    "ENV_KEY",
    "ENV_URL",
    "Fleet",
    "FleetError",
    "FleetKillResult",
    "FleetRuntime",
    "FleetSession",
    "FleetUnavailable",
    "NoAnswer",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = __name__
del _name, _obj
