"""User-facing errors.

A :class:`LowrankError` is a mistake the user can fix (a wrong path, a bad option, unusable data).
The CLI prints its message as one line and exits with code 2; anything else is a bug and keeps
its traceback.
"""


class LowrankError(Exception):
    """An error caused by the user's input; the message names the problem and the fix."""
