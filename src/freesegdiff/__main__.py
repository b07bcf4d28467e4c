"""``python -m freesegdiff`` runs the command line."""

import sys

from freesegdiff.cli import main

sys.exit(main())
