"""The package's layers import downward only (README, "How it is built").

Every import in ``kill_switch`` — ``TYPE_CHECKING`` ones included, since a type-level
circle is a design circle all the same — goes from a layer to the same layer or one
below it:

0. vocabulary: frozen values, protocols, validators, the audit's event kinds;
1. mechanisms: the planes (tool tasks, threads, processes) and the audit store;
2. the runtime: session, guard, stop, runtime, ledger, sentinel, cleanup;
3. operations: watchdog, shutdown, supervisor, drill;
4. surfaces: the control plane, the CLI, ``kill_switch.testing``, the integrations.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kill_switch

PACKAGE = Path(kill_switch.__file__).parent

#: Folder (or module) of the package → its layer. The longest matching prefix wins.
LAYERS: dict[str, int] = {
    "_vocabulary": 0,
    "_planes": 1,
    "_audit": 1,
    "_session": 2,
    "_tools": 2,
    "_session_host": 2,
    "_guard": 2,
    "_stop": 2,
    "_runtime": 2,
    "_ledger": 2,
    "_sentinel": 2,
    "_cleanup": 2,
    "_loop_monitor": 2,
    "_watchdog": 3,
    "_shutdown": 3,
    "_supervisor": 3,
    "_drill": 3,
    "_drill_results": 3,
    "control": 4,
    "_cli": 4,
    "testing": 4,
    "integrations": 4,
    "fleet": 4,
    "__main__": 5,
    "__init__": 5,
}


#: Upward imports allowed on purpose, each with its reason (a test checks none is stale).
ALLOWED: dict[tuple[str, str], str] = {
    # ``Runtime(fleet="redis://…")`` joins a fleet: the runtime builds the fleet's link,
    # imported lazily (no redis until a fleet is asked for); the fleet itself sees the
    # runtime only through its public API.
    ("_runtime", "fleet"): "the fleet join",
    ("_runtime", "fleet._link"): "the fleet join",
}


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    """The layer of a module named relative to the package (``_planes._threads``)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        layer = LAYERS.get(".".join(parts[:n]))
        if layer is not None:
            return layer
    return None


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module relative to the package) for every import of the package
    in *path*; ``from . import x`` names ``x`` (a module) as imported."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    package = module.split(".") if is_pkg else module.split(".")[:-1]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "kill_switch" or alias.name.startswith("kill_switch."):
                    out.append((node.lineno, alias.name.removeprefix("kill_switch").lstrip(".")))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                name = node.module or ""
                if not (name == "kill_switch" or name.startswith("kill_switch.")):
                    continue
                base = name.removeprefix("kill_switch").lstrip(".").split(".")
                base = [b for b in base if b]
            else:
                keep = len(package) - (node.level - 1)
                base = package[:keep] + (node.module.split(".") if node.module else [])
            if node.module is None or (node.level == 0 and node.module == "kill_switch"):
                # ``from . import _threads``: each name is a module (or a package name).
                for alias in node.names:
                    if alias.name.startswith("__"):  # an attribute: __version__
                        out.append((node.lineno, ".".join(base)))
                    else:
                        out.append((node.lineno, ".".join([*base, alias.name])))
            else:
                out.append((node.lineno, ".".join(base)))
    return out


def violations(root: Path) -> list[str]:
    """Every upward import (and every module of no layer) in the package at *root*."""
    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        mine = layer_of(module)
        if mine is None:
            found.append(f"{module}: in no layer (add it to LAYERS)")
            continue
        for line, target in imports_of(path, module):
            # The package itself (its public names) is what surfaces build on.
            theirs = layer_of(target) if target else 4
            if theirs is None:
                found.append(f"{module}:{line} imports {target}, which is in no layer")
            elif theirs > mine and (module, target) not in ALLOWED:
                found.append(f"{module}:{line} (layer {mine}) imports {target} (layer {theirs})")
    return found


def test_layers_import_downward_only() -> None:
    """No module of kill_switch imports from a layer above its own."""
    assert violations(PACKAGE) == []


def test_an_upward_import_is_caught(tmp_path: Path) -> None:
    """Negative control: a vocabulary module importing the session is reported."""
    pkg = tmp_path / "kill_switch"
    (pkg / "_vocabulary").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "_vocabulary" / "__init__.py").write_text("")
    (pkg / "_session.py").write_text("from ._vocabulary import _report\n")
    (pkg / "_vocabulary" / "_report.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .._session import Session\n"
    )
    assert violations(pkg) == ["_vocabulary._report:3 (layer 0) imports _session (layer 2)"]


def test_no_allowed_exception_is_stale() -> None:
    """Every allowed upward import still exists (an exception that no longer applies goes)."""
    seen = {
        (module_name(path, PACKAGE), target)
        for path in PACKAGE.rglob("*.py")
        for _, target in imports_of(path, module_name(path, PACKAGE))
    }
    assert set(ALLOWED) <= seen


def test_every_module_has_a_layer() -> None:
    """Each module is placed (a new module must say where it belongs)."""
    assert not [v for v in violations(PACKAGE) if "no layer" in v]
