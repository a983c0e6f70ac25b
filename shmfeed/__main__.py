"""`python -m shmfeed`: the same command line as the `shmfeed` console script."""

import sys

from ._cli.main import main

sys.exit(main())
