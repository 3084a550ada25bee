"""User-facing errors.

Library code raises :class:`LlmquantError` with a one-line message that names
the problem; only ``cli.py`` turns it into an exit code. Anything else that
escapes is a bug and keeps its traceback.
"""


class LlmquantError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2
