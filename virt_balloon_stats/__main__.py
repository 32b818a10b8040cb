"""``python -m virt_balloon_stats`` runs the ``virt-balloon-stats`` command."""

import sys

from virt_balloon_stats.cli import main

sys.exit(main())
