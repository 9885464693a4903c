"""Model definitions and checkpoint loading, kept apart from the engine."""
