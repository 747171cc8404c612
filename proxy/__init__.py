"""The bpo-proxy gateway: an OpenAI-compatible reverse proxy that optimizes prompts."""

__version__ = "0.1.0"
