"""The one exception type users see.

A `VlrtError` carries a single line that names the problem and the fix. The command line
prints it as `vlrt: error: <message>` and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class VlrtError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class OutputClosed(VlrtError):
    """The reader of our output went away (a closed pipe)."""

    exit_code = 3
