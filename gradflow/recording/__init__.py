"""gradflow.recording."""
__all__: list[str] = []
