"""Errors raised by klora_core.  One class so callers can catch everything we raise."""


class KLoRAError(ValueError):
    """A K-LoRA input or state that cannot be used, with a message that says why and what to do."""
