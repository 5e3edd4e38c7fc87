"""The integrations package: imported lazily, and a clear error without the extra."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

MODULES = {
    "pydantic_ai": ("pydantic_ai", "pydantic-ai"),
    "openai_agents": ("agents", "openai-agents"),
    "langgraph": ("langchain_core", "langgraph"),
    "mcp": ("mcp", "mcp"),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_without_the_extra_the_import_error_names_it(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the framework missing, importing the integration says which extra to install."""
    framework, extra = MODULES[name]
    # An import of it (or of a submodule another test already loaded) now fails.
    for loaded in [m for m in sys.modules if m == framework or m.startswith(framework + ".")]:
        monkeypatch.setitem(sys.modules, loaded, None)
    monkeypatch.setitem(sys.modules, framework, None)
    monkeypatch.delitem(sys.modules, f"kill_switch.integrations.{name}", raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'kill-switch\[{extra}\]'"):
        importlib.import_module(f"kill_switch.integrations.{name}")


def test_importing_kill_switch_imports_no_framework() -> None:
    """``import kill_switch`` (and the integrations package) loads none of the frameworks."""
    code = (
        "import sys, kill_switch, kill_switch.integrations\n"
        "print(sorted(m for m in ('pydantic_ai', 'agents', 'langgraph', 'langchain_core', 'mcp')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
