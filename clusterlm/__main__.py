"""`python -m clusterlm ...` is the same as the `clusterlm` command."""

import sys

from clusterlm.cli import main

sys.exit(main())
