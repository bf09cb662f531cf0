"""The exceptions that end a run on purpose: the CLI prints the message on one line and exits with `exit_code`.

Exit codes: 2 a user mistake, 3 a non-finite loss, 128 + the signal's number for a run stopped by a signal
(130 Ctrl-C, 143 SIGTERM); `DEBUG=1` exits 1 when the model does not learn.
"""


class RafaleError(Exception):
    """A problem the user can fix (a run file, a data source, a weights folder); never a bug in rafale."""

    exit_code = 2


class NonFiniteLoss(RafaleError):
    """The training loss became NaN or infinite: the run stops before saving anything after it."""

    exit_code = 3


class Interrupted(RafaleError):
    """A signal stopped training after a checkpoint; the message says how to resume. Not a mistake: no `error:`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
