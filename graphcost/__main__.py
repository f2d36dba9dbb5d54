"""`python -m graphcost ...` is the `graphcost` command."""

import sys

from graphcost.cli.main import main

sys.exit(main())
