"""`python -m tierkv`: the same command line as `tierkv`."""

import sys

from tierkv.cli import main

sys.exit(main())
