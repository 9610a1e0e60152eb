"""`python -m streams` runs the command line (the same as `acsr-metrics`)."""

import sys

from streams.tools.cli import main

sys.exit(main())
