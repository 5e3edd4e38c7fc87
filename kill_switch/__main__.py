"""``python -m kill_switch`` runs the ``kill-switch`` command."""

import sys

from ._cli import main

sys.exit(main())
