"""The engine: request intake, scheduling, stepping the model, streaming results."""
