"""``python -m proxy`` runs the ``bpo`` command line."""

import sys

from proxy.cli import main

sys.exit(main())
