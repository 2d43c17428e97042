"""The one exception type of the pipeline."""


class QctfeaError(RuntimeError):
    """An error a user can act on: it names the input and what to change."""
