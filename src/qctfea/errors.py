"""The exception types of the pipeline."""


class QctfeaError(RuntimeError):
    """An error a user can act on: it names the input and what to change. ``record``: the
    text the workflow's records and tables keep instead, when the message lists what only
    the user's log may hold (the series UIDs and descriptions of a DICOM folder)."""

    def __init__(self, message: str = "", record: str | None = None):
        super().__init__(message)
        self.record = record


class GateRefusal(QctfeaError):
    """A scan refused by one of its quality gates (a calibration fit below its R² gate, a
    registration outside its Dice or spread gates): the input was read and the step ran, but
    the number it would give rests on a failed check. In the workflow the step records the
    message (key ``refused`` of its JSON) and the scan's gate rule fails it, so that with
    ``--keep-going`` the cohort tables are built without that scan and list it."""
