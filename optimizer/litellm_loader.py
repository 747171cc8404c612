"""litellm for our callers: imported lazily and offline-safe (its import costs seconds and, by default, a network
fetch), and the model name to give it."""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

# litellm's loggers. It gives them handlers of its own at import (plain text, next to the application's);
# at DEBUG and INFO they write request bodies, prompts included.
LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy")


@functools.cache
def load_litellm() -> ModuleType:
    """litellm, imported once, with the bundled model cost map instead of a download at import."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    for name in LITELLM_LOGGERS:  # before the import: it logs while it loads
        logging.getLogger(name).setLevel(logging.WARNING)  # never its DEBUG/INFO lines: they hold prompts
    import litellm

    litellm.suppress_debug_info = True
    for name in LITELLM_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = []  # its records go to the application's handlers (the gateway's JSON lines)
        logger.propagate = True
    return litellm


def litellm_model(model: str, base_url: str | None) -> str:
    """The litellm model name: an explicit base URL means an OpenAI-compatible server, which litellm's
    ``openai/`` provider speaks to (the judge of ``bpo eval``, the shadow judge, the critic)."""
    if base_url and not model.startswith("openai/"):
        return "openai/" + model
    return model
