"""Errors for user mistakes: the CLI prints their message (no traceback) and exits 2."""


class UserError(Exception):
    """A problem the user can fix (bad config, bad data, missing file).

    The message must say where (file, line, field) and what to do.
    """
