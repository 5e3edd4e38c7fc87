"""The control plane's optional dependencies: say which extra to install if one is missing."""

from __future__ import annotations

import importlib.util

for _dist in ("starlette", "uvicorn"):
    if importlib.util.find_spec(_dist) is None:
        raise ImportError(
            f"kill_switch.control needs {_dist}: install the server extra "
            "(pip install 'kill-switch[server]')"
        )
