"""gradflow.analysis."""
__all__: list[str] = []
