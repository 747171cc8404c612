"""The bpo-proxy gateway: an OpenAI-compatible reverse proxy that optimizes prompts."""

from importlib.metadata import PackageNotFoundError, version

try:  # the one place the version is written is pyproject.toml
    __version__ = version("bpo-proxy")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"
