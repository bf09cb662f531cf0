"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class RafaleError(Exception):
    """A problem the user can fix (a run file, a data source, a weights folder); never a bug in rafale."""

    exit_code = 2
