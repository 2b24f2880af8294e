"""`python -m eval`: the same command as `simvq-codec eval`."""

import sys

from eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
