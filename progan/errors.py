"""Errors a user can cause (bad path, bad image folder, bad checkpoint).

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class ProganError(Exception):
    """A problem with the user's input, reported as a one-line message."""
