"""Offline tooling that rebuilds the prompt optimizer: data construction, fine-tuning and evaluation."""
