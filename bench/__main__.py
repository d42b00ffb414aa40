"""``python -m bench``: measure, print a table, write the JSON results."""

from __future__ import annotations

import sys

from .run import main

sys.exit(main())
