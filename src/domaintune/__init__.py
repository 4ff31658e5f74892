"""domaintune: turn a small open LM into a domain assistant."""

__version__ = "0.1.0"
