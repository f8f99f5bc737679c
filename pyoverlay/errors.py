"""Errors meant for the user: one line, no traceback."""


class PyoverlayError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits 1."""


class UsageError(PyoverlayError):
    """Bad arguments or options; the CLI exits 2."""
