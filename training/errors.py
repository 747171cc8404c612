"""The training package's exception tree: what the CLI reports as a one-line error instead of a trace."""

from __future__ import annotations


class TrainingError(Exception):
    """Base of every error a user can fix (bad input, bad flag, unreachable model)."""


class DataError(TrainingError, ValueError):
    """An input file or record does not have the shape a stage needs."""


class ConfigError(TrainingError, ValueError):
    """A flag combination that cannot work."""


class ChatError(TrainingError, RuntimeError):
    """A chat model gave no usable answer after every retry (or failed in a way retrying cannot fix)."""
