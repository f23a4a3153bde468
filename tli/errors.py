"""User-facing errors.

Every problem caused by the user's input (a path, a flag, a config file) is raised as
:class:`TliError`. The CLI turns it into one line on stderr and exit code 2, with no traceback.
Anything else that escapes is a bug in tli and keeps its traceback.
"""


class TliError(Exception):
    """Bad input: the message says what is wrong and what to do about it."""

    exit_code = 2
