"""``python -m app``: the same as ``clip-serve``."""

import sys

from .cli import main

sys.exit(main())
