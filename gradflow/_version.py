"""The package version, in a module of its own: reading it imports nothing else (pyproject.toml
reads it statically as well)."""

__version__ = "0.1.0"
