"""gradflow.tasks."""
__all__: list[str] = []
