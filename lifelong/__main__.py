"""``python -m lifelong``: the command line."""

import sys

from lifelong.tools.cli import main

sys.exit(main())
