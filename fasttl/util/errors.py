"""The errors fasttl raises for what a user asked for or handed it (an option, a path, a file):
the CLI prints them as one line naming the culprit and the fix, without a traceback."""
from __future__ import annotations


class UserError(Exception):
    """Base of every error caused by the user's input rather than by fasttl."""


class OptionError(UserError, ValueError):
    """An option value out of its range or in conflict with another option."""


class DataError(UserError, ValueError):
    """A dataset problem, naming the file or folder at fault and how to fix it (one line)."""
