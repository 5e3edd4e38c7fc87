"""kill_switch: the kill switch for async AI agents.

One ``interrupt()`` stops everything an agent session is doing, proves it stopped, and
says who stopped it and why.
"""

from importlib.metadata import PackageNotFoundError, version

from ._audit import AuditEvent as AuditEvent
from ._audit import AuditSink as AuditSink
from ._current import check as check
from ._current import current_session as current_session
from ._current import sleep as sleep
from ._decision import Decision as Decision
from ._decision import ToolCall as ToolCall
from ._exceptions import Interrupted as Interrupted
from ._exceptions import KillSwitchError as KillSwitchError
from ._exceptions import LimitExceeded as LimitExceeded
from ._exceptions import SessionRefused as SessionRefused
from ._exceptions import ToolBlocked as ToolBlocked
from ._handle import InterruptHandle as InterruptHandle
from ._info import SessionInfo as SessionInfo
from ._policy import StopPolicy as StopPolicy
from ._report import InterruptRequest as InterruptRequest
from ._report import Latency as Latency
from ._report import LeakedTask as LeakedTask
from ._report import StopReport as StopReport
from ._runtime import Runtime as Runtime
from ._session import Session as Session
from ._triggers import TRIGGERS as TRIGGERS
from ._triggers import Trigger as Trigger

try:
    __version__ = version("kill-switch")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "TRIGGERS",
    "AuditEvent",
    "AuditSink",
    "Decision",
    "InterruptHandle",
    "InterruptRequest",
    "Interrupted",
    "KillSwitchError",
    "Latency",
    "LeakedTask",
    "LimitExceeded",
    "Runtime",
    "Session",
    "SessionInfo",
    "SessionRefused",
    "StopPolicy",
    "StopReport",
    "ToolBlocked",
    "ToolCall",
    "Trigger",
    "check",
    "current_session",
    "sleep",
]

# Public objects say they live where users import them from (as httpx and trio do).
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) or callable(_obj):
        try:
            _obj.__module__ = __name__
        except (AttributeError, TypeError):
            pass
del _name, _obj
