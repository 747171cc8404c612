"""Test doubles that are real servers: a fake OpenAI-compatible provider on loopback."""
