"""Every audit event kind the package writes is declared in ``_audit_event.KINDS``."""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import typing

import pytest

import kill_switch
from kill_switch import _cleanup
from kill_switch._vocabulary import _audit_event as _audit

PACKAGE = pathlib.Path(kill_switch.__file__).parent
#: Functions that only pass a kind through from their own caller (checked at the callers).
FORWARDERS = {
    ("_session_host.py", "record"),  # Session.record(kind, ...) -> AuditEvent(kind, ...)
    ("_session_host.py", "_event"),  # Session._event(kind, ...) -> AuditEvent(kind, ...)
    ("_session_host.py", "_request"),  # window.record(event): built by _event above it
    ("_process_plane.py", "record"),  # ProcessPlane.record(kind, ...) -> session.record
    ("_runtime.py", "record"),  # Runtime.record(event) -> the sink and the listeners
    ("_runtime.py", "_record"),
    ("_runtime.py", "_to_sink"),  # the held events of a stop, handed over together
    ("_cleanup.py", "run_hooks"),  # kind: Literal[...] below
    ("_shutdown.py", "_record_forced_exit"),  # sink.record(event): built above it
}


def _module_strings(tree: ast.Module, module: str, *, is_package: bool) -> dict[str, str]:
    """Module-level ``NAME = "text"`` constants and names imported from other modules."""
    out: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            if (
                isinstance(target, ast.Name)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                out[target.id] = node.value.value
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and (node.level or node.module.startswith("kill_switch."))
        ):
            if node.level:
                # a package's __init__ is its own package; a module's is its parent
                up = node.level - 1 if is_package else node.level
                package = module.rsplit(".", up)[0] if up else module
                source = importlib.import_module(f"{package}.{node.module}")
            else:
                source = importlib.import_module(node.module)
            for alias in node.names:
                value = getattr(source, alias.name, None)
                if isinstance(value, str):
                    out[alias.asname or alias.name] = value
    return out


def kinds_written(path: pathlib.Path, module: str) -> tuple[set[str], list[str]]:
    """The kinds *path* writes, and the writer calls whose kind could not be resolved."""
    tree = ast.parse(path.read_text())
    names = _module_strings(tree, module, is_package=path.name == "__init__.py")
    found: set[str] = set()
    unresolved: list[str] = []
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    for fn in functions:
        for node in ast.walk(fn):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            # x.record(kind, ...) / x._record(kind, ...) write (a PlaneHost, a plane, the
            # runtime), x._event(kind, ...) builds one (a session's interrupt batch); a
            # bare _record(row) is the query module's decoder
            writes = (
                isinstance(func, ast.Attribute) and func.attr in ("record", "_record", "_event")
            ) or (isinstance(func, ast.Name) and func.id == "AuditEvent")
            if not writes or not node.args:
                continue
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.add(arg.value)
            elif isinstance(arg, ast.Name) and arg.id in names:
                found.add(names[arg.id])
            elif isinstance(arg, ast.Call):
                continue  # runtime._record(AuditEvent(...)): the inner call is checked
            elif (path.name, fn.name) not in FORWARDERS:
                unresolved.append(f"{path.name}:{node.lineno} {ast.unparse(arg)}")
    return found, unresolved


def package_modules() -> list[tuple[pathlib.Path, str]]:
    """Every module of the package, with its dotted name."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out.append((path, ".".join(p for p in parts if p != "__init__")))
    return out


def test_every_kind_written_is_declared() -> None:
    """Every x.record()/x._record()/AuditEvent() call in the package names a declared kind."""
    written: set[str] = set()
    unresolved: list[str] = []
    for path, module in package_modules():
        found, lost = kinds_written(path, module)
        written |= found
        unresolved += lost
    assert unresolved == [], "writer calls whose kind is not a declared constant"
    assert written - _audit.KINDS == set()
    # the scan does see the writers (not an empty pass): these come from five modules
    assert {"session_started", "process_signal", "thread_abandoned", "sentinel_alert"} <= written
    assert {"forced_exit", "control_denied", "limit_exceeded"} <= written


def test_cleanup_kinds_are_declared() -> None:
    """The cleanup runner's kinds (its Literal parameter) are in KINDS."""
    annotation = inspect.signature(_cleanup.run_hooks).parameters["kind"].annotation
    literal = typing.get_args(eval(annotation, {"Literal": typing.Literal}))
    assert set(literal) == {_audit.CLEANUP, _audit.ROLLBACK}


def test_kinds_constants_and_set_agree() -> None:
    """KINDS is exactly the module's upper-case str constants, each its own lower-case name."""
    constants = {
        name: value
        for name, value in vars(_audit).items()
        if name.isupper() and isinstance(value, str)
    }
    assert set(constants.values()) == _audit.KINDS
    for name, value in constants.items():
        assert value == name.lower(), name
    assert _audit.STICKY_KINDS <= _audit.KINDS


def test_scan_flags_an_undeclared_kind(tmp_path: pathlib.Path) -> None:
    """Negative control: a writer of an unknown kind, or of a kind in a variable, is caught."""
    bad = tmp_path / "_bad.py"
    bad.write_text(
        "def f(session, kind):\n    session._record('made_up_kind')\n    session._record(kind)\n"
    )
    found, unresolved = kinds_written(bad, "kill_switch._bad")
    assert found - _audit.KINDS == {"made_up_kind"}
    assert unresolved == ["_bad.py:3 kind"]


@pytest.mark.parametrize(
    "module",
    [
        "_vocabulary._limits",
        "_ledger",
        "_sentinel",
        "_planes._threads",
        "_planes._process_plane",
        "_planes._escalation",
        "_planes._spawn",
    ],
)
def test_planes_define_no_kinds_of_their_own(module: str) -> None:
    """No plane module declares kind constants any more; they import them from _audit."""
    source = inspect.getsource(importlib.import_module(f"kill_switch.{module}"))
    tree = ast.parse(source)
    own = [
        target.id
        for node in tree.body
        if isinstance(node, ast.AnnAssign | ast.Assign)
        for target in ([node.target] if isinstance(node, ast.AnnAssign) else node.targets)
        if isinstance(target, ast.Name)
        and isinstance(node.value, ast.Constant)
        and node.value.value in _audit.KINDS
    ]
    assert own == []
