"""`python -m graphcost ...` is the `graphcost` command."""

import sys

from graphcost.cli import main

sys.exit(main())
