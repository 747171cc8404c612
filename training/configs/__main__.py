"""Print the path of a shipped launcher config: ``python -m training.configs accelerate_zero2``."""

from __future__ import annotations

import sys

from training.configs import available, config_path
from training.errors import ConfigError

if len(sys.argv) != 2:
    print("usage: python -m training.configs NAME\nconfigs: " + ", ".join(available()), file=sys.stderr)
    sys.exit(2)
try:
    print(config_path(sys.argv[1]))
except ConfigError as exc:
    print(exc, file=sys.stderr)
    sys.exit(2)
