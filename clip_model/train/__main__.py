"""``python -m clip_model.train``: the same as ``clip-train``."""

import sys

from .cli import main

sys.exit(main())
