"""``python -m phonepush`` runs the command-line interface."""

import sys

from phonepush.cli import main

sys.exit(main())
