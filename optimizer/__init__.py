"""Prompt optimizers: the BPO model and the backends that serve it."""
