"""kill_switch: the kill switch for async AI agents.

One ``interrupt()`` stops everything an agent session is doing, proves it stopped, and
says who stopped it and why.
"""

import contextlib
import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from ._cleanup import Transaction as Transaction
from ._planes._context import bind as bind
from ._planes._context import check as check
from ._planes._context import sleep as sleep
from ._planes._escalation import EscalationPolicy as EscalationPolicy
from ._planes._escalation import EscalationWarning as EscalationWarning
from ._planes._spawn import TrackedProcess as TrackedProcess
from ._planes._threads import abandoned_threads as abandoned_threads
from ._planes._threads import from_thread as from_thread
from ._runtime import Runtime as Runtime
from ._sentinel import Alert as Alert
from ._sentinel import CallRate as CallRate
from ._sentinel import CostVelocity as CostVelocity
from ._sentinel import DeniedCalls as DeniedCalls
from ._sentinel import Detector as Detector
from ._sentinel import ErrorStreak as ErrorStreak
from ._sentinel import RepeatedCall as RepeatedCall
from ._sentinel import Sentinel as Sentinel
from ._sentinel import default_detectors as default_detectors
from ._session import Session as Session
from ._session import current_session as current_session
from ._shutdown import GracefulShutdown as GracefulShutdown
from ._shutdown import graceful_shutdown as graceful_shutdown
from ._supervisor import Supervisor as Supervisor
from ._supervisor import supervise as supervise
from ._tools import bind_session as bind_session
from ._tools import tool as tool
from ._vocabulary._audit_event import AuditEvent as AuditEvent
from ._vocabulary._audit_event import AuditSink as AuditSink
from ._vocabulary._decision import Decision as Decision
from ._vocabulary._decision import ToolCall as ToolCall
from ._vocabulary._exceptions import Interrupted as Interrupted
from ._vocabulary._exceptions import KillSwitchError as KillSwitchError
from ._vocabulary._exceptions import LimitExceeded as LimitExceeded
from ._vocabulary._exceptions import SessionRefused as SessionRefused
from ._vocabulary._exceptions import ToolBlocked as ToolBlocked
from ._vocabulary._handle import InterruptHandle as InterruptHandle
from ._vocabulary._limits import Limits as Limits
from ._vocabulary._limits import LimitWarning as LimitWarning
from ._vocabulary._limits import ToolRules as ToolRules
from ._vocabulary._limits import report_cost as report_cost
from ._vocabulary._policy import StopPolicy as StopPolicy
from ._vocabulary._report import CleanupReport as CleanupReport
from ._vocabulary._report import InterruptRequest as InterruptRequest
from ._vocabulary._report import Latency as Latency
from ._vocabulary._report import LeakedTask as LeakedTask
from ._vocabulary._report import ProcessReport as ProcessReport
from ._vocabulary._report import StopReport as StopReport
from ._vocabulary._report import ThreadReport as ThreadReport
from ._vocabulary._snapshots import CallInfo as CallInfo
from ._vocabulary._snapshots import ProcessInfo as ProcessInfo
from ._vocabulary._snapshots import SessionInfo as SessionInfo
from ._vocabulary._snapshots import ThreadInfo as ThreadInfo
from ._vocabulary._triggers import TRIGGERS as TRIGGERS
from ._vocabulary._triggers import Trigger as Trigger
from ._watchdog import EXIT_FORCED as EXIT_FORCED
from ._watchdog import EXIT_FORCED_C_LEVEL as EXIT_FORCED_C_LEVEL
from ._watchdog import Watchdog as Watchdog
from .fleet import Fleet as Fleet  # no redis import until a fleet connects

if TYPE_CHECKING:  # imported on first use (below), so that type checkers see them too
    from ._audit._query import AuditLog as AuditLog
    from ._audit._query import AuditRecord as AuditRecord
    from ._audit._query import CascadeNode as CascadeNode
    from ._audit._query import VerifyResult as VerifyResult
    from ._audit._query import verify as verify_audit
    from ._audit._sqlite import AuditStatistics as AuditStatistics
    from ._audit._sqlite import SqliteAudit as SqliteAudit
    from ._drill import DrillShape as DrillShape
    from ._drill import drill as drill
    from ._drill import run_drills as run_drills
    from ._drill_results import DrillCheck as DrillCheck
    from ._drill_results import DrillObjectives as DrillObjectives
    from ._drill_results import DrillResult as DrillResult
    from ._drill_results import DrillSummary as DrillSummary
    from ._drill_results import DrillVerdict as DrillVerdict

#: Names whose modules are imported on first access: ``import kill_switch`` does not load
#: aiosqlite, sqlite3 or the drill until an audit log or a drill is asked for.
_LAZY: dict[str, tuple[str, str]] = {
    "AuditLog": ("._audit._query", "AuditLog"),
    "AuditRecord": ("._audit._query", "AuditRecord"),
    "AuditStatistics": ("._audit._sqlite", "AuditStatistics"),
    "CascadeNode": ("._audit._query", "CascadeNode"),
    "DrillCheck": ("._drill_results", "DrillCheck"),
    "DrillObjectives": ("._drill_results", "DrillObjectives"),
    "DrillResult": ("._drill_results", "DrillResult"),
    "DrillShape": ("._drill", "DrillShape"),
    "DrillSummary": ("._drill_results", "DrillSummary"),
    "DrillVerdict": ("._drill_results", "DrillVerdict"),
    "SqliteAudit": ("._audit._sqlite", "SqliteAudit"),
    "VerifyResult": ("._audit._query", "VerifyResult"),
    "drill": ("._drill", "drill"),
    "run_drills": ("._drill", "run_drills"),
    "verify_audit": ("._audit._query", "verify"),
}

try:
    __version__ = version("kill-switch")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "EXIT_FORCED",
    "EXIT_FORCED_C_LEVEL",
    "TRIGGERS",
    "Alert",
    "AuditEvent",
    "AuditLog",
    "AuditRecord",
    "AuditSink",
    "AuditStatistics",
    "CallInfo",
    "CallRate",
    "CascadeNode",
    "CleanupReport",
    "CostVelocity",
    "Decision",
    "DeniedCalls",
    "Detector",
    "DrillCheck",
    "DrillObjectives",
    "DrillResult",
    "DrillShape",
    "DrillSummary",
    "DrillVerdict",
    "ErrorStreak",
    "EscalationPolicy",
    "EscalationWarning",
    "Fleet",
    "GracefulShutdown",
    "InterruptHandle",
    "InterruptRequest",
    "Interrupted",
    "KillSwitchError",
    "Latency",
    "LeakedTask",
    "LimitExceeded",
    "LimitWarning",
    "Limits",
    "ProcessInfo",
    "ProcessReport",
    "RepeatedCall",
    "Runtime",
    "Sentinel",
    "Session",
    "SessionInfo",
    "SessionRefused",
    "SqliteAudit",
    "StopPolicy",
    "StopReport",
    "Supervisor",
    "ThreadInfo",
    "ThreadReport",
    "ToolBlocked",
    "ToolCall",
    "ToolRules",
    "TrackedProcess",
    "Transaction",
    "Trigger",
    "VerifyResult",
    "Watchdog",
    "abandoned_threads",
    "bind",
    "bind_session",
    "check",
    "current_session",
    "default_detectors",
    "drill",
    "from_thread",
    "graceful_shutdown",
    "report_cost",
    "run_drills",
    "sleep",
    "supervise",
    "tool",
    "verify_audit",
]


def _claim(obj: object) -> None:
    """Public objects say they live where users import them from (as httpx and trio do)."""
    if isinstance(obj, type) or callable(obj):
        with contextlib.suppress(AttributeError, TypeError):
            obj.__module__ = __name__


for _name in __all__:
    if _name not in _LAZY:
        _claim(globals()[_name])
del _name


if not TYPE_CHECKING:  # hidden from type checkers: they would take any name as valid

    def __getattr__(name: str) -> object:
        """Import a lazy public name on first access (PEP 562), and keep it."""
        try:
            module, attr = _LAZY[name]
        except KeyError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        obj = getattr(importlib.import_module(module, __name__), attr)
        _claim(obj)
        globals()[name] = obj  # later lookups do not come here again
        return obj


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
