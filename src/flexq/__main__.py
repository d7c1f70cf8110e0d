"""``python -m flexq``: the ``flexq`` command."""

from __future__ import annotations

import sys

from flexq._cli import main

sys.exit(main())
