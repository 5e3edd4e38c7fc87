"""The public namespace: explicit, sorted, and every name says it lives in kill_switch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kill_switch as ks

ROOT = Path(ks.__file__).resolve().parent.parent


def test_all_is_sorted_and_unique() -> None:
    """``__all__`` is sorted (isort style: constants, classes, functions) and unique."""

    def key(name: str) -> tuple[int, str]:
        if name.isupper():
            return (0, name)
        return (1, name) if name[0].isupper() else (2, name)

    assert list(ks.__all__) == sorted(set(ks.__all__), key=key)


def test_all_names_exist_and_claim_the_package() -> None:
    """Every exported class and function reports ``__module__ == "kill_switch"``."""
    for name in ks.__all__:
        obj = getattr(ks, name)
        if isinstance(obj, type) or callable(obj):
            assert obj.__module__ == "kill_switch", name


def test_design_contract_names_exist() -> None:
    """The names the design brief promises are all there."""
    for name in [
        "Runtime", "Session", "StopReport", "Decision", "InterruptHandle", "SessionInfo",
        "KillSwitchError", "Interrupted", "ToolBlocked", "LimitExceeded", "check", "sleep",
    ]:  # fmt: skip
        assert hasattr(ks, name), name


def test_exception_hierarchy() -> None:
    """Every error derives from KillSwitchError; Interrupted, a cancellation, from BaseException."""
    assert issubclass(ks.ToolBlocked, ks.KillSwitchError)
    assert issubclass(ks.LimitExceeded, ks.ToolBlocked)
    assert issubclass(ks.SessionRefused, ks.KillSwitchError)
    assert issubclass(ks.KillSwitchError, Exception)
    assert issubclass(ks.Interrupted, BaseException)
    assert not issubclass(ks.Interrupted, Exception)


def test_version_is_a_string() -> None:
    """``__version__`` comes from the installed metadata."""
    assert isinstance(ks.__version__, str)
    assert ks.__version__


def _fresh(code: str) -> subprocess.CompletedProcess[str]:
    """Run *code* in a fresh interpreter (nothing imported yet) with this checkout first."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )


def test_import_does_not_load_sqlite_or_the_drill() -> None:
    """``import kill_switch`` loads neither aiosqlite, sqlite3 nor the drill; first use does."""
    heavy = ["aiosqlite", "sqlite3", "kill_switch._audit._sqlite", "kill_switch._audit._store",
             "kill_switch._audit._query", "kill_switch._drill"]  # fmt: skip
    code = (
        "import sys, kill_switch\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
        "kill_switch.SqliteAudit\n"
        "print('aiosqlite' in sys.modules, 'kill_switch._drill' in sys.modules)\n"
    )
    done = _fresh(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "True False"]


def test_every_name_resolves_in_a_fresh_interpreter() -> None:
    """Each ``__all__`` name resolves (lazy ones through ``__getattr__``), claims the
    package, is listed by ``dir()``, and ``import *`` brings them all."""
    code = (
        "import kill_switch as ks\n"
        "assert set(ks.__all__) <= set(dir(ks)), set(ks.__all__) - set(dir(ks))\n"
        "for name in ks.__all__:\n"
        "    obj = getattr(ks, name)\n"
        "    if isinstance(obj, type) or callable(obj):\n"
        "        assert obj.__module__ == 'kill_switch', (name, obj.__module__)\n"
        "ns = {}\n"
        "exec('from kill_switch import *', ns)\n"
        "assert set(ks.__all__) <= set(ns), set(ks.__all__) - set(ns)\n"
        "assert ks.verify_audit.__name__ == 'verify'\n"
        "print('ok')\n"
    )
    done = _fresh(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok\n"


def test_unknown_name_is_an_attribute_error() -> None:
    """A name that is neither eager nor lazy raises AttributeError naming it."""
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchThing'"):
        ks.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018


def test_lazy_names_are_visible_to_type_checkers() -> None:
    """The ``if TYPE_CHECKING:`` imports in ``__init__`` are exactly the lazy table, so a
    type checker sees every lazy name with its real type."""
    tree = ast.parse((ROOT / "kill_switch" / "__init__.py").read_text())
    guarded = next(
        node
        for node in tree.body
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
    )
    imported = {
        alias.asname or alias.name: (f".{node.module}", alias.name)
        for node in guarded.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert imported == ks._LAZY
