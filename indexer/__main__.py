"""``python -m indexer`` runs the ``clip-index`` command line."""

import sys

from .cli import main

sys.exit(main())
