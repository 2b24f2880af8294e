"""`python -m training train|export ...` (also what `torchrun -m training` runs)."""

import sys

from training.cli import main

sys.exit(main())
