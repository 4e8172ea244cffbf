"""Loader for the csrc/ native row kernels (placeholder until the extension lands)."""


def available() -> bool:
    """Whether the compiled row kernels can be used."""
    return False
