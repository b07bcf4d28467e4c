"""``python -m freesegdiff.cli``: the same as the ``freesegdiff`` command."""

import sys

from freesegdiff.cli import main

sys.exit(main())
