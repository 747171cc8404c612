"""Import litellm lazily and offline-safe: its import costs seconds and, by default, a network fetch."""

from __future__ import annotations

import functools
import os
from types import ModuleType


@functools.cache
def load_litellm() -> ModuleType:
    """litellm, imported once, with the bundled model cost map instead of a download at import."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    return litellm
