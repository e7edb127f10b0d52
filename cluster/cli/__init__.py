"""The ``moray`` command line: parse (:mod:`cluster.cli.parser`), run the command's handler
(:mod:`cluster.cli.commands`), and turn bad input into a one-line error and exit code 2 (a job that
missed its promise, e.g. MOPO's constraints: 1). ``moray --help`` lists every command."""

from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from cluster.cli.commands import COMMANDS  # noqa: E402
from cluster.cli.parser import build_parser  # noqa: E402
from trainers.core.runtime import interactive, quiet_progress  # noqa: E402
from trainers.job import PromiseUnmet  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_progress(interactive())  # a log file gets sentences; bars stay on a terminal
    try:
        return COMMANDS[args.command](args) or 0
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        print(f"moray: error: {e}", file=sys.stderr)
        return 2
    except PromiseUnmet as e:
        print(f"moray: error: {e}", file=sys.stderr)
        return 1

