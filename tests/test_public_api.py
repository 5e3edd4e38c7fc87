"""The public namespace: explicit, sorted, and every name says it lives in kill_switch."""

from __future__ import annotations

import kill_switch as ks


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
