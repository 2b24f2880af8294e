"""`python -m server serve ...`: the same as `simvq-codec serve`."""

import sys

from server.cli import main

sys.exit(main())
