"""``python -m cluster.cli``: the ``moray`` command of this checkout."""

import sys

from cluster.cli import main

sys.exit(main())
