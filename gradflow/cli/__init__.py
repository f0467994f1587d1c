"""gradflow command-line interface (click group; one module per command)."""

from __future__ import annotations

__all__ = ["main"]


def main() -> None:  # replaced by the click group in gradflow.cli.main
    from .main import cli

    cli()
